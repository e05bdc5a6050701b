"""Measure a batch of trained DUFM runs from their files and compare each with theory: metrics
(results/metrics/{run}), comparison and verdict (results/theory/{run}); the logic is
dnc.dufm.batch.measure_batch."""

import torch

from dnc.device import configure_determinism
from dnc.dufm.batch import measure_batch
from dnc.dufm.compare import Tolerances
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.paths import run_paths

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
p = snakemake.params
torch.set_num_threads(snakemake.threads)

tolerances = {r: Tolerances(**t) for r, t in p.tolerances.items()}
verdicts = measure_batch(p.runs, p.settings, {r: run_paths(r) for r in p.runs}, Convention(**p.convention),
                         tolerances, device=p.device, batch_rows=p.batch_rows)
log.info("verdicts:\n%s", verdicts[["run", "verdict", "rel_gap"]].to_string(index=False))
