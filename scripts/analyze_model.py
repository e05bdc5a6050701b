"""Inside a model trained elsewhere: per layer of its MLP head (the Linear+ReLU chain ending in the
classifier), NC1/NC2 of its input, S V^T projection, ReLU output and AGOP projection, the SVD share
and the NFA correlation at every checkpoint step (docs/models.md, "MLP heads").

Output: the network analysis table (run, layer, representation, split, step, metric, value,
convention) plus node, step = checkpoint step; no rows without a head. The logic is
dnc.models.analysis.analyze_model.
"""

import torch

from dnc.data import read_split
from dnc.device import configure_determinism
from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.models.analysis import analyze_model

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
run_id, p, inp = snakemake.wildcards.run, snakemake.params, snakemake.input
torch.set_num_threads(snakemake.threads)
convention = Convention(**p.convention)
splits = {s: read_split(inp.dataset, s)[:2] for s in ("train", "test")}
steps = [(int(step), path or None) for step, path in p.steps]
table = analyze_model(p.settings, run_id, steps, splits, p.device, p.agop_samples, convention)
write_parquet(table, snakemake.output.analysis, {"dnc:run": run_id, "dnc:convention": convention.__dict__,
                                                 "dnc:agop_samples": p.agop_samples})
