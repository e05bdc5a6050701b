"""Train a batch of DUFM runs of one shape together, then write, measure and compare each run.

Outputs, per run: history, features, weights (results/dufm/{run}), metrics (results/metrics/{run})
and the comparison with theory (results/theory/{run}); the logic is dnc.dufm.batch.
"""

import torch

from dnc.dufm.batch import run_batch, run_paths
from dnc.dufm.compare import Tolerances
from dnc.logs import configure_logging
from dnc.metrics import Convention

log = configure_logging(snakemake.log[0])  # noqa: F821
p = snakemake.params  # noqa: F821
torch.set_num_threads(snakemake.threads)  # noqa: F821

log.info("batch of %d DUFM runs: %s", len(p.runs), ", ".join(p.runs))
tolerances = {r: Tolerances(**t) for r, t in p.tolerances.items()}
verdicts = run_batch(p.runs, p.settings, {r: run_paths(r) for r in p.runs}, Convention(**p.convention),
                     tolerances, device=p.device, batch_rows=p.batch_rows)
log.info("verdicts:\n%s", verdicts[["run", "verdict", "rel_gap"]].to_string(index=False))
