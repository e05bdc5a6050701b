# DUFM runs are compared with theory by their dufm_measure job (dufm.smk).
rule compare_network:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
        history=NET.history,
        objective=NET.objective,
        metrics=NET.metrics,
        features=NET.features,
    output:
        comparison=NET.comparison,
        verdict=NET.verdict,
    log:
        "logs/compare_network/{run}.log",
    params:
        settings=net_train_settings,
        tolerances=NET_TOLERANCES,
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/compare_network.py"
