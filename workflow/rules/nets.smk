rule prepare_dataset:
    output:
        dataset="results/datasets/{dataset}.parquet",
    log:
        "logs/prepare_dataset/{dataset}.log",
    params:
        spec=lambda w: config["datasets"][w.dataset],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/prepare_dataset.py"


rule train_network:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
    output:
        history="results/nets/{run}/history.parquet",
        snapshots=directory("results/nets/{run}/snapshots"),
    log:
        "logs/train_network/{run}.log",
    params:
        settings=net_train_settings,
        # The job's private scratch space (resume after a kill); no other rule reads it.
        resume_dir=lambda w: f"results/nets/{w.run}/resume",
        device=config["device"],
        version=DNC_VERSION,
    threads: config["net_resources"]["threads"]
    resources:
        gpu=config["net_resources"]["gpu"],
        mem_mb=config["net_resources"]["mem_mb"],
        runtime=config["net_resources"]["runtime"],
    script:
        "../../scripts/train_network.py"


rule extract_features:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
        history="results/nets/{run}/history.parquet",
        snapshots="results/nets/{run}/snapshots",
        ood=net_ood_dataset,
    output:
        features=directory("results/nets/{run}/features"),
        objective="results/nets/{run}/objective.parquet",
    log:
        "logs/extract_features/{run}.log",
    params:
        settings=net_extract_settings,
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/extract_features.py"
