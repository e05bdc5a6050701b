"""Per-layer features of a trained network at each feature epoch, for the train and test splits.

Outputs: the feature folder (dnc.layout: epoch<E>_<split>.parquet and epoch<E>_weights.parquet)
and the DUFM objective of the head (backbone output as H_1, train split) at each epoch; of a
diverged run, only the feature epochs it reached (none: an empty folder and objective table).
With an ood_dataset, also the features of its test split (epoch<E>_ood.parquet, for NC5). The
logic is dnc.nets.extract.extract_epochs.
"""

import torch

from dnc.data import read_split
from dnc.device import configure_determinism, resolve_device
from dnc.io import write_parquet
from dnc.layout import OOD_SPLIT
from dnc.logs import configure_logging
from dnc.nets.extract import check_ood_shape, extract_epochs
from dnc.nets.train import reached_epochs, read_history

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
run_id, p, out, inp = snakemake.wildcards.run, snakemake.params, snakemake.output, snakemake.input
torch.set_num_threads(snakemake.threads)
splits = {s: read_split(inp.dataset, s) for s in ("train", "test")}
ood = [inp.ood] if isinstance(inp.ood, str) else list(inp.ood)  # zero or one dataset file
if ood:
    splits[OOD_SPLIT] = read_split(ood[0], "test")
    check_ood_shape(splits[OOD_SPLIT][0], splits["train"][0], ood[0], inp.dataset)
epochs = reached_epochs(p.settings["feature_epochs"], read_history(inp.history))
objective = extract_epochs(run_id, inp.snapshots, epochs, {s: v[:2] for s, v in splits.items()}, out.features,
                           splits["train"][2]["num_classes"], p.settings["lambda_H1"], p.settings["lambda_W"],
                           str(resolve_device(p.device)))
write_parquet(objective, out.objective)
