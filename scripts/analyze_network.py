"""Inside a trained network: NC1/NC2 of each head layer's input, S V^T projection, ReLU output and
AGOP projection, the SVD share and the NFA correlation, at every feature epoch (docs/agop.md).

Output: a tidy table (run, layer, representation, split, step, metric, value, convention), step =
epoch; the logic is dnc.nets.analysis.
"""

import pandas as pd
import torch

from dnc.data import read_split
from dnc.device import resolve_device
from dnc.io import read_frame, write_parquet
from dnc.layout import snapshot_file
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.metrics.streaming import empty_metrics
from dnc.nets.analysis import analyze_splits
from dnc.nets.train import reached_epochs, restore_net

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id, p, inp = snakemake.wildcards.run, snakemake.params, snakemake.input  # noqa: F821
torch.set_num_threads(snakemake.threads)  # noqa: F821
device = str(resolve_device(p.device))
convention = Convention(**p.convention)
splits = {s: read_split(inp.dataset, s)[:2] for s in ("train", "test")}
agop_samples = p.settings.get("agop_samples")

history = read_frame(inp.history, {"epoch": "int", "train_loss": "float"})
frames = []
for epoch in reached_epochs(p.settings["feature_epochs"], history):
    net, _ = restore_net(snapshot_file(inp.snapshots, epoch), device)
    frames.append(analyze_splits(net, splits, epoch, agop_samples, convention))
    at = frames[-1].query("split == 'train' and metric in ('nc1_trace', 'svd_share', 'nfa_sqrt')")
    log.info("epoch %d (train):\n%s", epoch, at.pivot_table("value", "layer", ["representation", "metric"]))
# A diverged run may have reached no feature epoch: an empty table of the same columns.
empty = empty_metrics().drop(columns=["run", "convention"])
table = pd.concat(frames, ignore_index=True) if frames else empty
table.insert(0, "run", run_id)
table["convention"] = f"{convention.describe()};agop_samples={agop_samples}"
write_parquet(table, snakemake.output.analysis, {"dnc:run": run_id, "dnc:convention": convention.__dict__,  # noqa: F821
                                                 "dnc:agop_samples": agop_samples})
