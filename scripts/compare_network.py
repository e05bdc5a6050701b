"""Compare a trained network's head with the DUFM theory at its last feature epoch.

Outputs: comparison (one row per checked quantity) and verdict (one row, with
recovered_dufm_optimum); the logic is dnc.nets.compare.
"""


from dnc.io import read_frame, read_metadata, read_weights, write_parquet
from dnc.layout import weights_file
from dnc.logs import configure_logging
from dnc.metrics.streaming import METRICS_COLUMNS
from dnc.nets.compare import compare_network, diverged_network, head_settings
from dnc.nets.train import diverged_epoch

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id, inp, p = snakemake.wildcards.run, snakemake.input, snakemake.params  # noqa: F821

meta = read_metadata(inp.dataset, "dnc:dataset")
settings = head_settings(meta["num_classes"], meta["counts"]["train"], p.settings["head_layers"],
                         p.settings["lambda_H1"], p.settings["lambda_W"])
history = read_frame(inp.history, {"epoch": "int", "train_loss": "float"})
if diverged_epoch(history) is not None:
    comparison, verdict = diverged_network(run_id, {**settings, "lr": p.settings["lr"]}, history)
else:
    objective = read_frame(inp.objective, {"epoch": "int", "loss": "float"})
    weights = read_weights(weights_file(inp.features, int(objective["epoch"].max())))
    metrics = read_frame(inp.metrics, METRICS_COLUMNS)
    comparison, verdict = compare_network(run_id, settings, objective, metrics, weights, p.tolerances)
log.info("%s: %s (K = %d, n = N / K = %.4g)", run_id, verdict["verdict_text"].iloc[0], settings["K"],
         settings["n"])
write_parquet(comparison, snakemake.output.comparison)  # noqa: F821
write_parquet(verdict, snakemake.output.verdict)  # noqa: F821
