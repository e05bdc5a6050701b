# One job per batch of DUFM runs of the same shape (dnc.config.dufm_batches; batch size set per
# experiment by its `batch` key, default 1): training, metrics and the comparison with theory of
# those runs, each run keeping its own output files.
for _batch, _runs in DUFM_BATCHES.items():

    rule:
        name:
            batch_rule_name(_batch)
        output:
            per_run_outputs(_runs),
        log:
            f"logs/dufm_batch/{_batch}.log",
        params:
            runs=_runs,
            settings={r: RUNS[r] for r in _runs},
            convention=config["metrics"]["convention"],
            tolerances={r: DUFM_TOLERANCES[r] for r in _runs},
            batch_rows=config["metrics"]["batch_rows"],
            device=config["device"],
            version=DNC_VERSION,
        threads: 1
        resources:
            gpu=config["dufm_resources"]["gpu"],
            mem_mb=config["dufm_resources"]["mem_mb"],
            runtime=config["dufm_resources"]["runtime"],
        script:
            "../../scripts/dufm_batch.py"
