# DUFM runs are compared with theory inside their batch job (dufm.smk).
rule compare_network:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
        history="results/nets/{run}/history.parquet",
        objective="results/nets/{run}/objective.parquet",
        metrics="results/metrics/{run}/metrics.parquet",
        features="results/nets/{run}/features",
    output:
        comparison="results/theory/{run}/comparison.parquet",
        verdict="results/theory/{run}/verdict.parquet",
    log:
        "logs/compare_network/{run}.log",
    params:
        settings=net_train_settings,
        tolerances=config["theory"]["network_tolerances"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compare_network.py"
