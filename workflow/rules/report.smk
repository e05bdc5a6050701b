rule build_report:
    input:
        histories=per_run("history", RUNS, run_paths),
        metrics=per_run("metrics", RUNS, run_paths),
        comparisons=per_run("comparison", RUNS, run_paths),
        verdicts=per_run("verdict", RUNS, run_paths),
        net_histories=per_run("history", NET_RUNS, net_paths),
        net_metrics=per_run("metrics", NET_RUNS, net_paths),
        net_comparisons=per_run("comparison", NET_RUNS, net_paths),
        net_verdicts=per_run("verdict", NET_RUNS, net_paths),
        # networks, and the MLP heads of model experiments (analyze_model)
        analyses=per_run("analysis", NET_RUNS, net_paths)
        + per_run("analysis", [r for r in MODEL_RUNS if r not in LM_RUNS], net_paths),
        rfm_metrics=per_run("metrics", RFM_RUNS, rfm_paths),
        rfm_layers=per_run("layers", RFM_RUNS, rfm_paths),
        # Gram matrices: Deep RFM runs, and networks (not model experiments: analyze_model writes none)
        grams=per_run("grams", RFM_RUNS, rfm_paths) + per_run("grams", NET_RUNS, net_paths),
        model_metrics=per_run("metrics", MODEL_RUNS, model_paths),
        # language models: the token windows of their text datasets (token frequencies, the cut)
        lm_datasets=sorted({dataset_path(s["dataset"]) for s in LM_RUNS.values()}),
        lm_histories=[lm_train_paths(n).history for n in LM_TRAINING],
    output:
        summary=report(REPORT.summary, caption="../report/summary.rst", category="Report"),
        html=report(REPORT.html, caption="../report/index.rst", category="Report"),
    log:
        "logs/build_report/report.log",
    params:
        # As dnc.config expands them: settings in their dataclass's field order (the summary's
        # column order), grid keys sorted, so the same whatever the order of the config's keys.
        runs=RUNS,
        net_runs=NET_RUNS,
        rfm_runs=RFM_RUNS,
        model_runs=MODEL_RUNS,
        lm_training=LM_TRAINING,
        configfiles=[str(f) for f in workflow.configfiles],
        # the stale partial report of an earlier failed invocation, removed once this one is built
        partial=[REPORT.partial_summary, REPORT.partial_html],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/build_report.py"
