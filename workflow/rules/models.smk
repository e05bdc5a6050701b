# Models trained elsewhere (docs/models.md): one extraction job per (experiment, checkpoint step),
# writing a network-style feature folder, then one metrics job per experiment over its steps.
rule extract_model:
    wildcard_constraints:
        run=MODEL_RUN,
        step=r"\d+",
    input:
        checkpoint=model_checkpoint,
        source=model_source,
        dataset=model_dataset,
    output:
        train=MODEL.step_files("{step}")[0],
        test=MODEL.step_files("{step}")[1],
        weights=MODEL.step_files("{step}")[2],
    log:
        "logs/extract_model/{run}/{step}.log",
    params:
        settings=model_extract_settings,
        device=config["device"],
        version=DNC_VERSION,
    threads: config["model_resources"]["threads"]
    resources:
        gpu=gpu_resource("model_resources"),
        mem_mb=config["model_resources"]["mem_mb"],
        runtime=config["model_resources"]["runtime"],
    script:
        "../../scripts/extract_model.py"


rule model_metrics:
    wildcard_constraints:
        run=MODEL_RUN,
    input:
        features=model_feature_files,
        weights=model_weight_files,
    output:
        metrics=MODEL.metrics,
    log:
        "logs/model_metrics/{run}.log",
    params:
        convention=CONVENTION,
        batch_rows=config["metrics"]["batch_rows"],
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    resources:
        gpu=gpu_resource(),
        mem_mb=config["model_resources"]["mem_mb"],
        runtime=config["model_resources"]["runtime"],
    script:
        "../../scripts/model_metrics.py"


# The MLP head of a model experiment (the Linear+ReLU chain ending in its classifier), analysed as a
# network's head at every checkpoint step (docs/models.md, "MLP heads"); no rows without a head.
# Written where a network's analysis goes (run ids are unique across kinds); the report reads it.
rule analyze_model:
    wildcard_constraints:
        run=MODEL_RUN,
    input:
        checkpoints=model_checkpoints,
        source=model_source,
        dataset=model_dataset,
    output:
        analysis=NET.analysis,
    log:
        "logs/analyze_model/{run}.log",
    params:
        settings=model_analysis_settings,
        steps=model_steps,
        convention=CONVENTION,
        # Not a model setting: the AGOP takes at most 2,000 training rows, balanced over classes
        # (dnc.nets.analysis.agop_rows), for speed; every row when the split has fewer.
        agop_samples=2000,
        device=config["device"],
        version=DNC_VERSION,
    threads: config["model_resources"]["threads"]
    resources:
        gpu=gpu_resource("model_resources"),
        mem_mb=config["model_resources"]["mem_mb"],
        runtime=config["model_resources"]["runtime"],
    script:
        "../../scripts/analyze_model.py"


# An example training script (examples/, no dnc imports) run as a user would run theirs: it writes
# the data it used (data.npz) and a state dict at each epoch in `save`.
for _name, _example in EXAMPLES.items():

    rule:
        name:
            f"train_example_{_name}"
        input:
            script=_example["script"],
        output:
            data=example_paths(_name, _example["save"])[0],
            checkpoints=example_paths(_name, _example["save"])[1],
        log:
            f"logs/train_example/{_name}.log",
        params:
            out=lambda w, output: os.path.dirname(output.data),
            save=",".join(map(str, _example["save"])),
            seed=_example.get("seed", 0),
        threads: 1
        shell:
            "python {input.script} --out {params.out} --save {params.save} --seed {params.seed} > {log} 2>&1"
