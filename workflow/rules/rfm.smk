rule deep_rfm:
    wildcard_constraints:
        run=RFM_RUN,
    input:
        dataset=rfm_dataset,
    output:
        metrics="results/metrics/{run}/metrics.parquet",
        layers="results/rfm/{run}/layers.parquet",
        features=directory("results/rfm/{run}/features"),
    log:
        "logs/deep_rfm/{run}.log",
    params:
        settings=rfm_settings,
        convention=config["metrics"]["convention"],
        device=config["device"],
        version=DNC_VERSION,
    threads: config["rfm_resources"]["threads"]
    resources:
        gpu=config["rfm_resources"]["gpu"],
        mem_mb=config["rfm_resources"]["mem_mb"],
        runtime=config["rfm_resources"]["runtime"],
    script:
        "../../scripts/deep_rfm.py"
