rule compute_metrics:
    wildcard_constraints:
        run=DUFM_RUN,
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
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compute_metrics.py"
