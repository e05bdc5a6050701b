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
    log:
        "logs/train_network/{run}.log",
    params:
        settings=net_settings,
        out_dir=lambda w: f"results/nets/{w.run}",
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
    output:
        features=directory("results/nets/{run}/features"),
        objective="results/nets/{run}/objective.parquet",
    log:
        "logs/extract_features/{run}.log",
    params:
        settings=net_settings,
        epochs=lambda w: NET_RUNS[w.run]["feature_epochs"],
        checkpoints=lambda w: f"results/nets/{w.run}/resume",
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/extract_features.py"


rule compute_net_metrics:
    wildcard_constraints:
        run=NET_RUN,
    input:
        features="results/nets/{run}/features",
    output:
        metrics="results/metrics/{run}/metrics.parquet",
    log:
        "logs/compute_metrics/{run}.log",
    params:
        convention=config["metrics"]["convention"],
        batch_rows=config["metrics"]["batch_rows"],
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compute_metrics.py"


rule compare_net_theory:
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
        "logs/compare_theory/{run}.log",
    params:
        settings=net_settings,
        tolerances=config["theory"]["network_tolerances"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compare_net_theory.py"
