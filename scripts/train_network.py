"""Train one network with a DUFM head, resuming from its private resume folder when rerun.

Outputs: the training history (train/test loss and accuracy per epoch) and the snapshots folder
(the parameters at every feature epoch, read by extract_features). A run that diverges ends with a
non-finite history row and exports the feature epochs it reached (dnc.nets.train).
"""

import pandas as pd
import torch

from dnc.data import read_split
from dnc.device import configure_determinism
from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.nets.train import diverged_epoch, export_snapshots, reached_epochs, train_network
from dnc.settings import NetConfig

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
run_id, settings, p = snakemake.wildcards.run, snakemake.params.settings, snakemake.params
torch.set_num_threads(snakemake.threads)

cfg = NetConfig.from_settings(settings, device=p.device)
splits = {s: read_split(snakemake.input.dataset, s) for s in ("train", "test")}
data, meta = {s: v[:2] for s, v in splits.items()}, splits["train"][2]
log.info("training %s on %s: %s", run_id, meta["name"], cfg)
rows = train_network(cfg, data, p.resume_dir, meta["num_classes"], run=run_id, on_conflict="restart",
                     on_nonfinite="stop")
export_snapshots(p.resume_dir, snakemake.output.snapshots, reached_epochs(cfg.feature_epochs, rows))
history = pd.DataFrame(rows)
history.insert(0, "run", run_id)
log.info("final: %s", history.iloc[-1].to_dict())
stop = diverged_epoch(rows)
write_parquet(history, snakemake.output.history, {"dnc:config": settings, "dnc:run": run_id,
                                                  **({"dnc:diverged_epoch": stop} if stop else {})})
