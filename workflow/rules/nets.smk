rule prepare_dataset:
    input:
        dataset_inputs,
    output:
        dataset=dataset_path("{dataset}"),
    log:
        "logs/prepare_dataset/{dataset}.log",
    params:
        spec=lambda w: DATASETS[w.dataset],
        # an image folder's files (an edited image changes no folder's modification time)
        files=lambda w: source_fingerprint(make_spec(DATASETS[w.dataset])),
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
        history=NET.history,
        snapshots=directory(NET.snapshots),
    log:
        "logs/train_network/{run}.log",
    params:
        settings=net_train_settings,
        # The job's private scratch space (resume after a kill); no other rule reads it.
        resume_dir=lambda w: net_paths(w.run).resume,
        device=config["device"],
        version=DNC_VERSION,
    threads: config["net_resources"]["threads"]
    resources:
        gpu=gpu_resource("net_resources"),
        mem_mb=config["net_resources"]["mem_mb"],
        runtime=config["net_resources"]["runtime"],
    script:
        "../../scripts/train_network.py"


rule extract_features:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
        history=NET.history,
        snapshots=NET.snapshots,
        ood=net_ood_dataset,
    output:
        features=directory(NET.features),
        objective=NET.objective,
    log:
        "logs/extract_features/{run}.log",
    params:
        settings=net_extract_settings,
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    resources:
        gpu=gpu_resource(),
    script:
        "../../scripts/extract_features.py"
