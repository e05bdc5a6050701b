"""Per-layer features of a trained network at each feature epoch, for the train and test splits.

Outputs: the feature folder (dnc.layout: epoch<E>_<split>.parquet and epoch<E>_weights.parquet)
and the DUFM objective of the head (backbone output as H_1, train split) at each epoch; of a
diverged run, only the feature epochs it reached (none: an empty folder and objective table).
With an ood_dataset, also the features of its test split (epoch<E>_ood.parquet, for NC5).
"""

from pathlib import Path

import pandas as pd
import torch

from dnc.data import read_split
from dnc.device import resolve_device
from dnc.io import BadInputError, read_frame, write_features, write_parquet, write_weights
from dnc.layout import OOD_SPLIT, feature_file, snapshot_file, weights_file
from dnc.logs import configure_logging
from dnc.nets.extract import head_objective, network_features
from dnc.nets.train import reached_epochs, restore_net

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id, p, out, inp = snakemake.wildcards.run, snakemake.params, snakemake.output, snakemake.input  # noqa: F821
torch.set_num_threads(snakemake.threads)  # noqa: F821
device = str(resolve_device(p.device))
splits = {s: read_split(inp.dataset, s) for s in ("train", "test")}
K = splits["train"][2]["num_classes"]
ood = [inp.ood] if isinstance(inp.ood, str) else list(inp.ood)  # zero or one dataset file
if ood:
    splits[OOD_SPLIT] = read_split(ood[0], "test")
    if splits[OOD_SPLIT][0].shape[1:] != splits["train"][0].shape[1:]:
        raise BadInputError(f"{ood[0]}: OOD samples of shape {tuple(splits[OOD_SPLIT][0].shape[1:])}, but "
                            f"the network was trained on {inp.dataset} of shape "
                            f"{tuple(splits['train'][0].shape[1:])}; choose an ood_dataset of that shape")

history = read_frame(inp.history, {"epoch": "int", "train_loss": "float"})
out_dir = Path(out.features)
out_dir.mkdir(parents=True, exist_ok=True)
rows = []
for epoch in reached_epochs(p.settings["feature_epochs"], history):
    net, _ = restore_net(snapshot_file(inp.snapshots, epoch), device)
    weights = [w.detach().cpu().numpy() for w in net.head.weights]
    write_weights(weights_file(out.features, epoch), weights, {"dnc:run": run_id, "dnc:step": epoch})
    for split, (X, y, _) in splits.items():
        cols, pred = network_features(net, X)
        meta = {"dnc:run": run_id, "dnc:step": epoch, "dnc:split": split}
        write_features(feature_file(out.features, epoch, split), y.numpy(), cols, pred, meta)
        if split == "train":  # from the features just extracted: no second forward pass
            terms = head_objective(cols[0][1], y, weights, K, p.settings["lambda_H1"], p.settings["lambda_W"])
    rows.append({"run": run_id, "epoch": epoch, **terms})
    log.info("epoch %d: DUFM objective of the head %s", epoch, rows[-1])
write_parquet(pd.DataFrame(rows, columns=None if rows else ["run", "epoch", "loss"]), out.objective)
