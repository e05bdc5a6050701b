"""Per-layer features of a trained network at each feature epoch, for the train and test splits.

Outputs: a folder with one feature file per (epoch, split) (epoch<E>_<split>.parquet) and one
head-weights file per epoch (epoch<E>_weights.parquet), and the DUFM objective of the head
(backbone output as H_1) at each epoch.
"""

from pathlib import Path

import pandas as pd
import torch

from dnc.data import read_split
from dnc.dufm import resolve_device
from dnc.extract import network_features, objective_terms
from dnc.io import write_features, write_parquet, write_weights
from dnc.logs import configure_logging
from dnc.train import restore_net

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id = snakemake.wildcards.run  # noqa: F821
p = snakemake.params  # noqa: F821
out = snakemake.output  # noqa: F821
torch.set_num_threads(snakemake.threads)  # noqa: F821
device = str(resolve_device(p.device))
data = {s: read_split(snakemake.input.dataset, s)[:2] for s in ("train", "test")}  # noqa: F821

folder = Path(out.features)
folder.mkdir(parents=True, exist_ok=True)
rows = []
for epoch in p.epochs:
    net, _ = restore_net(Path(p.checkpoints) / f"epoch{epoch}.pt", device)
    weights = [w.detach().cpu().numpy() for w in net.head.weights]
    write_weights(folder / f"epoch{epoch}_weights.parquet", weights, {"dnc:run": run_id, "dnc:step": epoch})
    for split, (X, y) in data.items():
        cols, pred = network_features(net, X)
        meta = {"dnc:run": run_id, "dnc:step": epoch, "dnc:split": split}
        write_features(folder / f"epoch{epoch}_{split}.parquet", y.numpy(), cols, pred, meta)
        if split == "train":  # the objective from the features just extracted: no second forward pass
            objective = objective_terms(cols[0][1], cols[-1][1], y, weights,
                                        p.settings["lambda_H1"], p.settings["lambda_W"])
    rows.append({"run": run_id, "epoch": epoch, **objective})
    log.info("epoch %d: DUFM objective %s", epoch, rows[-1])
write_parquet(pd.DataFrame(rows), out.objective)
