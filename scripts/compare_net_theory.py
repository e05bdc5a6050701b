"""Compare a trained network's head with the DUFM theory at its last feature epoch.

The DUFM objective evaluated on the network (backbone output as H_1, train split) is compared with
L_DNC for the same K, n = N / K, lambdas and depth L = head_layers + 1; per-layer metrics of the
train split against the DUFM predictions.
"""

from pathlib import Path

import pandas as pd

from dnc.compare import Tolerances, compare_run
from dnc.io import read_metadata, read_weights, write_parquet
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id = snakemake.wildcards.run  # noqa: F821
inputs, s = snakemake.input, snakemake.params.settings  # noqa: F821

meta = read_metadata(inputs.dataset, "dnc:dataset")
K, N = meta["num_classes"], meta["counts"]["train"]
objective = pd.read_parquet(inputs.objective).rename(columns={"epoch": "step"})
metrics = pd.read_parquet(inputs.metrics)
last = int(objective["step"].max())
metrics = metrics[(metrics["step"] == last) & (metrics["split"] == "train")]
settings = {"K": K, "L": s["head_layers"] + 1, "n": N / K, "lambda_H1": s["lambda_H1"],
            "lambda_W": s["lambda_W"]}
weights = read_weights(Path(inputs.features) / f"epoch{last}_weights.parquet")
tolerances = Tolerances(**snakemake.params.tolerances)  # noqa: F821
comparison, verdict = compare_run(run_id, settings, objective.assign(grad_norm=float("nan")), metrics,
                                  weights, tolerances, converged=True, always_structure=True)
# Recovered = the objective AND the per-layer structure agree within theory.network_tolerances.
loss_ok = bool(verdict["verdict"].isin(["global_optimum", "dnc"]).iloc[0])
v = verdict.iloc[0]
recovered = loss_ok and v["structure_failed"] == 0
verdict["recovered_dufm_optimum"] = recovered
# A trained network is not a stationary point of the DUFM: say what was measured, not "stationary".
verdict["verdict_text"] = (
    f"{'recovered' if recovered else 'did not recover'} DUFM-optimal features: objective "
    f"{v['rel_gap']:+.1%} vs L_DNC, {v['structure_failed']} of {v['structure_checks']} layer checks fail")
verdict["epoch"] = last
if N % K:
    log.warning("%s: %d samples for %d classes is not balanced; n = N / K = %.2f", run_id, N, K, N / K)
log.info("%s: %s (relative gap to L_DNC %.3g)", run_id, verdict["verdict_text"].iloc[0],
         verdict["rel_gap"].iloc[0])
write_parquet(comparison, snakemake.output.comparison)  # noqa: F821
write_parquet(verdict, snakemake.output.verdict)  # noqa: F821
