"""Train one network with a DUFM head; resumes from results/nets/{run}/checkpoints when rerun.

Output: the training history (train/test loss and accuracy per epoch). The parameters of every
feature epoch stay in the run's checkpoints folder for the feature stage.
"""

import pandas as pd
import torch

from dnc.data import read_split
from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.train import NetConfig, train_network

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id = snakemake.wildcards.run  # noqa: F821
settings = snakemake.params.settings  # noqa: F821
torch.set_num_threads(snakemake.threads)  # noqa: F821
torch.use_deterministic_algorithms(True, warn_only=True)

cfg = NetConfig.from_settings(settings, device=snakemake.params.device)  # noqa: F821
data, num_classes = {}, 0
for split in ("train", "test"):
    X, y, meta = read_split(snakemake.input.dataset, split)  # noqa: F821
    data[split], num_classes = (X, y), meta["num_classes"]
log.info("training %s on %s: %s", run_id, meta["name"], cfg)
rows = train_network(cfg, data, snakemake.params.out_dir, num_classes, run=run_id, on_conflict="restart")  # noqa: F821
history = pd.DataFrame(rows)
history.insert(0, "run", run_id)
log.info("final: %s", history.iloc[-1].to_dict())
write_parquet(history, snakemake.output.history, {"dnc:config": settings, "dnc:run": run_id})  # noqa: F821
