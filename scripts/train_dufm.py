"""Train one DUFM run by full-batch gradient descent.

Outputs: history (training curve), features (per-layer features of the final parameters, layout of
docs/schemas.md) and weights (W_1..W_L). Nothing is written if training fails.
"""

import pandas as pd
import torch

from dnc.dufm import DUFMConfig, train_dufm
from dnc.dufm.model import feature_columns
from dnc.io import write_features, write_parquet, write_weights
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id, settings, out = snakemake.wildcards.run, snakemake.params.settings, snakemake.output  # noqa: F821
torch.set_num_threads(snakemake.threads)  # noqa: F821

cfg = DUFMConfig.from_settings(settings, device=snakemake.params.device)  # noqa: F821
log.info("training %s: %s", run_id, cfg)
result = train_dufm(cfg, run=run_id)
log.info("stopped at step %d (converged by tol: %s), loss %.12g",
         result.steps, result.converged, result.history[-1]["loss"])

meta = {"dnc:config": settings, "dnc:run": run_id, "dnc:step": result.steps}
columns, labels, predictions = feature_columns(result.state)
write_weights(out.weights, [w.cpu().numpy() for w in result.state.W], meta)
write_features(out.features, labels, columns, predictions, meta)
history = pd.DataFrame(result.history)
history.insert(0, "run", run_id)
write_parquet(history, out.history, meta)
