# DUFM runs, each keeping its own files (dnc.paths.run_paths): dufm_train_<batch> trains a batch of
# runs of one shape together (dnc.config.dufm_batches; batch size set per experiment by its `batch`
# key, default 1); dufm_measure_<group> measures a group of an experiment's runs (its batches merged
# up to dnc.config.MEASURE_RUNS runs) from their files and compares them with theory. A metric or
# theory setting reruns only the measuring jobs.
for _batch, _runs in DUFM_BATCHES.items():

    rule:
        name:
            batch_rule_name("train", _batch)
        output:
            [f for r in _runs for f in run_paths(r).trained],
        log:
            f"logs/dufm_train/{_batch}.log",
        params:
            runs=_runs,
            settings=canonical({r: RUNS[r] for r in _runs}),
            device=config["device"],
            version=DNC_VERSION,
        threads: 1
        resources:
            gpu=gpu_resource("dufm_resources"),
            mem_mb=config["dufm_resources"]["mem_mb"],
            runtime=config["dufm_resources"]["runtime"],
        script:
            "../../scripts/dufm_train.py"


# Measuring takes a fraction of a second per run: batches are merged into few jobs (each pays a
# Python and torch start), but not into one per experiment (Snakemake's bookkeeping of a job grows
# with its inputs x outputs; dnc.config.dufm_measure_groups).
for _group, _runs in DUFM_MEASURE.items():

    rule:
        name:
            batch_rule_name("measure", _group)
        input:
            [f for r in _runs for f in run_paths(r).trained],
        output:
            [f for r in _runs for f in run_paths(r).measured],
        log:
            f"logs/dufm_measure/{_group}.log",
        params:
            runs=_runs,
            settings=canonical({r: RUNS[r] for r in _runs}),
            convention=CONVENTION,
            tolerances=canonical({r: DUFM_TOLERANCES[r] for r in _runs}),
            batch_rows=config["metrics"]["batch_rows"],
            device=config["device"],
            version=DNC_VERSION,
        threads: 1
        resources:
            gpu=gpu_resource(),
            mem_mb=config["dufm_resources"]["mem_mb"],
            runtime=config["dufm_resources"]["runtime"],
        script:
            "../../scripts/dufm_measure.py"
