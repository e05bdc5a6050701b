"""Train a batch of DUFM runs of one shape together and write each run's history, features and
weights (results/dufm/{run}); the logic is dnc.dufm.batch.train_batch."""

import torch

from dnc.device import configure_determinism
from dnc.dufm.batch import train_batch
from dnc.logs import configure_logging
from dnc.paths import run_paths

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
p = snakemake.params
torch.set_num_threads(snakemake.threads)

log.info("batch of %d DUFM runs: %s", len(p.runs), ", ".join(p.runs))
train_batch(p.runs, p.settings, {r: run_paths(r) for r in p.runs}, device=p.device)
