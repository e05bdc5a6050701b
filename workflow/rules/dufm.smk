rule train_dufm:
    wildcard_constraints:
        run=DUFM_RUN,
    output:
        history="results/dufm/{run}/history.parquet",
        features="results/dufm/{run}/features.parquet",
        weights="results/dufm/{run}/weights.parquet",
    log:
        "logs/train_dufm/{run}.log",
    params:
        settings=run_settings,
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    resources:
        gpu=config["dufm_resources"]["gpu"],
        mem_mb=config["dufm_resources"]["mem_mb"],
        runtime=config["dufm_resources"]["runtime"],
    script:
        "../../scripts/train_dufm.py"
