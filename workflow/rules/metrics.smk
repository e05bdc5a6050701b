# Metrics of a network run's feature folder. DUFM runs are measured inside their batch job
# (dufm.smk) and Deep RFM runs inside deep_rfm (rfm.smk), by the same library code.
rule compute_metrics:
    wildcard_constraints:
        run=NET_RUN,
    input:
        folder="results/nets/{run}/features",
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
