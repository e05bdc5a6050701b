# Language models (docs/language_models.md). A model trained inside the DAG (lm_training): its
# corpus (Python's own documentation), its byte-level BPE tokenizer, then the model with a folder
# per saved step. Every hf: experiment of `models:` is measured one checkpoint per job, two passes of
# the model over the text dataset's windows (no feature files), and its steps gathered.
rule lm_corpus:
    wildcard_constraints:
        name=LM_TRAIN,
    output:
        corpus=lm_train_paths("{name}").corpus,
    log:
        "logs/lm_corpus/{name}.log",
    params:
        # the documentation is Python's own: another Python version writes another corpus
        python=sys.version.split()[0],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/lm_corpus.py"


rule train_lm_tokenizer:
    wildcard_constraints:
        name=LM_TRAIN,
    input:
        corpus=lm_corpus_files,
    output:
        tokenizer=lm_train_paths("{name}").tokenizer,
    log:
        "logs/train_lm_tokenizer/{name}.log",
    params:
        vocab_size=lambda w: LM_TRAINING[w.name]["vocab_size"],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/train_lm_tokenizer.py"


for _name, _lm in LM_TRAINING.items():

    rule:
        name:
            f"train_lm_{_name}"
        input:
            dataset=dataset_path(_lm["dataset"]),
        output:
            history=lm_train_paths(_name).history,
            checkpoints=[f for s in _lm["save"] for f in lm_train_paths(_name).checkpoint_files(s)],
        log:
            f"logs/train_lm/{_name}.log",
        params:
            settings=_lm,
            folders=[lm_train_paths(_name).checkpoint(s) for s in _lm["save"]],
            device=config["device"],
            version=DNC_VERSION,
        threads: config["lm_resources"]["threads"]
        resources:
            gpu=gpu_resource("lm_resources"),
            mem_mb=config["lm_resources"]["mem_mb"],
            runtime=config["lm_resources"]["runtime"],
        script:
            "../../scripts/train_lm.py"


rule measure_lm:
    wildcard_constraints:
        run=LM_RUN,
        step=r"\d+",
    input:
        checkpoint=lm_checkpoint_files,
        dataset=model_dataset,
    output:
        metrics=MODEL.step_metrics("{step}"),
    log:
        "logs/measure_lm/{run}/{step}.log",
    params:
        settings=lm_measure_settings,
        folder=lm_checkpoint_dir,
        convention=CONVENTION,
        device=config["device"],
        version=DNC_VERSION,
    threads: config["lm_resources"]["threads"]
    resources:
        gpu=gpu_resource("lm_resources"),
        mem_mb=config["lm_resources"]["mem_mb"],
        runtime=config["lm_resources"]["runtime"],
    script:
        "../../scripts/measure_lm.py"


rule lm_metrics:
    wildcard_constraints:
        run=LM_RUN,
    input:
        steps=lm_step_files,
    output:
        metrics=MODEL.metrics,
    log:
        "logs/lm_metrics/{run}.log",
    params:
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/lm_metrics.py"
