rule compute_metrics:
    input:
        features="results/dufm/{run}/features.parquet",
        weights="results/dufm/{run}/weights.parquet",
    output:
        metrics="results/metrics/{run}/metrics.parquet",
    log:
        "logs/compute_metrics/{run}.log",
    params:
        convention=config["metrics"]["convention"],
        batch_rows=config["metrics"]["batch_rows"],
        split="train",
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compute_metrics.py"
