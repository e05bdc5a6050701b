# One metrics rule for every kind of run: metrics_inputs picks the run's feature files.
rule compute_metrics:
    wildcard_constraints:
        run=ANY_RUN,
    input:
        unpack(metrics_inputs),
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
