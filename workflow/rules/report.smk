rule build_report:
    input:
        histories=per_run("results/dufm/{run}/history.parquet"),
        metrics=per_run("results/metrics/{run}/metrics.parquet"),
        comparisons=per_run("results/theory/{run}/comparison.parquet"),
        verdicts=per_run("results/theory/{run}/verdict.parquet"),
    output:
        summary="results/report/summary.parquet",
        html="results/report/index.html",
    log:
        "logs/build_report/report.log",
    params:
        runs=RUNS,
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/build_report.py"
