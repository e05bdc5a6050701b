"""One extraction job of a model experiment: build the model, load one checkpoint (or keep the
seeded initialisation for step 0 of ``init: true``), and write the step's train and test feature
files and the classifier's weights (dnc.models.extract), for the metrics stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from dnc.data import read_split
from dnc.models.build import build_model
from dnc.models.checkpoints import load_checkpoint
from dnc.models.extract import extract_checkpoint
from dnc.models.layers import find_classifier
from dnc.settings import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["extract_step"]


def extract_step(settings: Mapping, run: str, step: int, checkpoint: str | os.PathLike | None,
                 dataset: str | os.PathLike, train_path: str | os.PathLike, test_path: str | os.PathLike,
                 weights_path: str | os.PathLike, device: str = "auto", progress: bool = True) -> dict:
    """Extract one checkpoint step of a model experiment.

    Args:
        settings: the experiment's settings (dnc.config.expand_model_runs).
        checkpoint: the step's checkpoint file; None for the untrained model (built with seed).
        dataset: the prepared dataset file (dnc.data); both splits are measured.
        train_path, test_path, weights_path: the step's output files (dnc.paths.ModelPaths).

    Returns:
        extract_checkpoint's summary (rows, accuracy per split, layers, widths, seconds).
    """
    cfg = ModelConfig.from_settings(settings, device=device)
    model = build_model(cfg.model, cfg.kwargs, seed=cfg.seed)
    if checkpoint:
        load_checkpoint(model, checkpoint, cfg.state_key)
    found = find_classifier(model, cfg.classifier)
    splits = {s: read_split(dataset, s) for s in ("train", "test")}
    meta = splits["train"][2]
    layers = cfg.layers if isinstance(cfg.layers, str) else list(cfg.layers)
    return extract_checkpoint(
        model, {s: (X, y) for s, (X, y, _) in splits.items()}, layers, cfg.pool,
        found[0] if found else None, cfg.batch_size, device,
        {"train": train_path, "test": test_path}, weights_path,
        metadata={"dnc:run": run, "dnc:step": int(step), "dnc:checkpoint": str(checkpoint or "init"),
                  "dnc:model": cfg.model},
        max_width=cfg.max_width, num_classes=int(meta["num_classes"]), progress=progress)
