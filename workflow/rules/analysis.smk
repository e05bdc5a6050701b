# Inside trained networks: per head layer, NC1/NC2 of its input, S V^T projection, ReLU output and
# AGOP projection, the SVD share and the NFA correlation at every feature epoch (docs/agop.md);
# the Gram matrices of the head input and every layer output at the last feature epoch.
rule analyze_network:
    wildcard_constraints:
        run=NET_RUN,
    input:
        dataset=net_dataset,
        history=NET.history,
        snapshots=NET.snapshots,
    output:
        analysis=NET.analysis,
        grams=NET.grams,
    log:
        "logs/analyze_network/{run}.log",
    params:
        settings=net_analysis_settings,
        convention=CONVENTION,
        device=config["device"],
        version=DNC_VERSION,
    threads: 1
    resources:
        gpu=gpu_resource(),
    script:
        "../../scripts/analyze_network.py"
