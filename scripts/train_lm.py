"""Train the small GPT-2 of one lm_training entry on its text dataset's train windows.

Outputs: the training history (train loss per step, test loss per saved step) and one Hugging Face
folder (config.json, model.safetensors) per saved step (dnc.lm.train.train_lm).
"""

import torch

from dnc.device import configure_determinism
from dnc.lm.train import train_lm
from dnc.logs import configure_logging
from dnc.settings import LMTrainConfig

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
torch.set_num_threads(snakemake.threads)
p = snakemake.params

settings = LMTrainConfig.from_settings(p.settings, device=p.device)
folders = dict(zip(p.settings["save"], p.folders, strict=True))  # params.folders: in the config's save order
log.info("training %s: %s", snakemake.rule, settings)
info = train_lm(settings, snakemake.input.dataset, folders, snakemake.output.history, device=p.device)
log.info("%d parameters, %d steps in %.0f s (%.2f s per step); test loss per saved step: %s",
         info["parameters"], settings.steps, info["seconds"], info["seconds_per_step"], info["test_loss"])
