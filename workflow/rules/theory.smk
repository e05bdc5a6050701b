rule compare_theory:
    wildcard_constraints:
        run=DUFM_RUN,
    input:
        history="results/dufm/{run}/history.parquet",
        weights="results/dufm/{run}/weights.parquet",
        metrics="results/metrics/{run}/metrics.parquet",
    output:
        comparison="results/theory/{run}/comparison.parquet",
        verdict="results/theory/{run}/verdict.parquet",
    log:
        "logs/compare_theory/{run}.log",
    params:
        settings=run_settings,
        tolerances=config["theory"]["tolerances"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compare_theory.py"


rule compare_network:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
        objective="results/nets/{run}/objective.parquet",
        metrics="results/metrics/{run}/metrics.parquet",
        features="results/nets/{run}/features",
    output:
        comparison="results/theory/{run}/comparison.parquet",
        verdict="results/theory/{run}/verdict.parquet",
    log:
        "logs/compare_network/{run}.log",
    params:
        settings=net_settings,
        tolerances=config["theory"]["network_tolerances"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compare_network.py"
