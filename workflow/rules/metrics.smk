# Metrics of a network run's feature folder. DUFM runs are measured by their dufm_measure job
# (dufm.smk) and Deep RFM runs inside deep_rfm (rfm.smk), by the same library code.
rule compute_metrics:
    wildcard_constraints:
        run=NET_RUN,
    input:
        folder=NET.features,
    output:
        metrics=NET.metrics,
    log:
        "logs/compute_metrics/{run}.log",
    params:
        convention=CONVENTION,
        batch_rows=config["metrics"]["batch_rows"],
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    resources:
        gpu=gpu_resource(),
    script:
        "../../scripts/compute_metrics.py"
