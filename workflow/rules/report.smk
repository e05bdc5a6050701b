rule build_report:
    input:
        histories=per_run("results/dufm/{run}/history.parquet"),
        metrics=per_run("results/metrics/{run}/metrics.parquet"),
        comparisons=per_run("results/theory/{run}/comparison.parquet"),
        verdicts=per_run("results/theory/{run}/verdict.parquet"),
        net_histories=per_run("results/nets/{run}/history.parquet", NET_RUNS),
        net_metrics=per_run("results/metrics/{run}/metrics.parquet", NET_RUNS),
        net_comparisons=per_run("results/theory/{run}/comparison.parquet", NET_RUNS),
        net_verdicts=per_run("results/theory/{run}/verdict.parquet", NET_RUNS),
        analyses=per_run("results/analysis/{run}/analysis.parquet", NET_RUNS),
        rfm_metrics=per_run("results/metrics/{run}/metrics.parquet", RFM_RUNS),
        rfm_layers=per_run("results/rfm/{run}/layers.parquet", RFM_RUNS),
    output:
        summary=report("results/report/summary.parquet", caption="../report/summary.rst",
                       category="Report"),
        html=report("results/report/index.html", caption="../report/index.rst", category="Report"),
    log:
        "logs/build_report/report.log",
    params:
        runs=RUNS,
        net_runs=NET_RUNS,
        rfm_runs=RFM_RUNS,
        configfiles=[str(f) for f in workflow.configfiles],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/build_report.py"
