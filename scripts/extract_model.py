"""Pooled per-layer features of one checkpoint of a model trained elsewhere, for the train and
test splits, and its classifier's weights (network feature-folder layout); the logic is
dnc.models.stage.extract_step."""

import torch

from dnc.device import configure_determinism
from dnc.logs import configure_logging
from dnc.models.stage import extract_step

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
p, w, inp, out = snakemake.params, snakemake.wildcards, snakemake.input, snakemake.output
torch.set_num_threads(snakemake.threads)

checkpoint = inp.checkpoint[0] if len(inp.checkpoint) else None
summary = extract_step(p.settings, w.run, int(w.step), checkpoint, inp.dataset, out.train, out.test,
                       out.weights, device=p.device)
log.info("%s step %s (%s): %s", w.run, w.step, checkpoint or "untrained", summary)
