"""Inside a trained network: NC1/NC2 of each head layer's input, S V^T projection, ReLU output and
AGOP projection, the SVD share and the NFA correlation, at every feature epoch (docs/agop.md).

Outputs: a tidy table (run, layer, representation, split, step, metric, value, convention), step =
epoch (dnc.nets.analysis.analyze_epochs), and the Gram matrices of the head input and every layer
output at the last analysed epoch (dnc.nets.analysis.network_grams; docs/schemas.md).
"""

import torch

from dnc.data import read_split
from dnc.device import configure_determinism, resolve_device
from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.nets.analysis import analyze_epochs, network_grams
from dnc.nets.train import reached_epochs, read_history
from dnc.settings import NetConfig

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
run_id, p, inp = snakemake.wildcards.run, snakemake.params, snakemake.input
torch.set_num_threads(snakemake.threads)
convention = Convention(**p.convention)
splits = {s: read_split(inp.dataset, s)[:2] for s in ("train", "test")}
cfg = NetConfig.from_settings(p.settings)  # validated, with the defaults of settings a config omits
agop_samples, split_input = cfg.agop_samples, cfg.split_input
epochs = reached_epochs(p.settings["feature_epochs"], read_history(inp.history))
device = str(resolve_device(p.device))
table = analyze_epochs(run_id, inp.snapshots, epochs, splits, device, agop_samples, convention, split_input)
last = max(epochs) if epochs else None  # the Grams: at the last analysed epoch
grams = network_grams(run_id, inp.snapshots, last, splits["train"], device, cfg.seed)
write_parquet(table, snakemake.output.analysis, {"dnc:run": run_id, "dnc:convention": convention.__dict__,
                                                 "dnc:agop_samples": agop_samples,
                                                 "dnc:split_input": split_input})
write_parquet(grams, snakemake.output.grams, {"dnc:run": run_id})
