rule deep_rfm:
    wildcard_constraints:
        run=RFM_RUN,
    input:
        dataset=rfm_dataset,
    output:
        metrics=RFM.metrics,
        layers=RFM.layers,
        features=directory(RFM.features),
        grams=RFM.grams,
    log:
        "logs/deep_rfm/{run}.log",
    params:
        settings=rfm_settings,
        convention=CONVENTION,
        device=config["device"],
        version=DNC_VERSION,
    threads: config["rfm_resources"]["threads"]
    resources:
        gpu=gpu_resource("rfm_resources"),
        mem_mb=config["rfm_resources"]["mem_mb"],
        runtime=config["rfm_resources"]["runtime"],
    script:
        "../../scripts/deep_rfm.py"
