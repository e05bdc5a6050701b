"""Per-layer collapse metrics of one checkpoint step of a language model (every chosen hidden state,
train and test windows, two passes of the model, no feature files): the step's tidy metrics; the
logic is dnc.lm.stage.measure_lm_step."""

import torch

from dnc.device import configure_determinism
from dnc.lm.stage import measure_lm_step
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
p, w, inp, out = snakemake.params, snakemake.wildcards, snakemake.input, snakemake.output
torch.set_num_threads(snakemake.threads)
# The job's own memory limit (Snakemake's mem_mb, MB = 10^6 bytes), read from the resources rather
# than a param so that changing it reruns nothing; the memory plan fits within it.
mem_mb = getattr(snakemake.resources, "mem_mb", None)
summary = measure_lm_step(p.settings, w.run, int(w.step), p.folder, inp.dataset, out.metrics, p.convention,
                          device=p.device, mem_mb=None if mem_mb is None else int(mem_mb))
log.info("%s step %s (%s): %s", w.run, w.step, p.folder or "random initialisation", summary)
