"""The compare_network stage as one function of its inputs' paths: a trained network's head
against the DUFM theory at its last feature epoch, or its "diverged" verdict (dnc.nets.compare).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import pandas as pd

from dnc.io import read_frame, read_metadata, read_weights
from dnc.layout import weights_file
from dnc.metrics.streaming import METRICS_COLUMNS
from dnc.nets.compare import compare_network, diverged_network, head_settings
from dnc.nets.train import diverged_epoch, read_history

log = logging.getLogger(__name__)

__all__ = ["OBJECTIVE_COLUMNS", "compare_network_stage"]

OBJECTIVE_COLUMNS = {"epoch": "int", "loss": "float"}  # what the comparison reads of an objective table


def compare_network_stage(run: str, dataset: str | os.PathLike, history: str | os.PathLike,
                          objective: str | os.PathLike, metrics: str | os.PathLike,
                          features: str | os.PathLike, settings: Mapping,
                          tolerances: Mapping[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(comparison, verdict) of one network run, from the files of the earlier stages.

    Args:
        dataset: the prepared dataset (its metadata gives K and the training split's size).
        history: train_network's history; a run that diverged gets diverged_network's verdict
            and none of the other files is read (they hold no epoch, or not the last one).
        objective, metrics, features: extract_features' objective table and feature folder (the
            head weights of the objective's last epoch) and compute_metrics' tidy table.
        settings: the run's network settings (head_layers, lambda_H1, lambda_W, lr).
        tolerances: overrides of dnc.nets.compare.NETWORK_TOLERANCES.
    """
    meta = read_metadata(dataset, "dnc:dataset")
    head = head_settings(meta["num_classes"], meta["counts"]["train"], settings["head_layers"],
                         settings["lambda_H1"], settings["lambda_W"])
    steps = read_history(history)
    if diverged_epoch(steps) is not None:
        comparison, verdict = diverged_network(run, {**head, "lr": settings["lr"]}, steps)
    else:
        table = read_frame(objective, OBJECTIVE_COLUMNS)
        weights = read_weights(weights_file(features, int(table["epoch"].max())))
        comparison, verdict = compare_network(run, head, table, read_frame(metrics, METRICS_COLUMNS),
                                              weights, tolerances)
    log.info("%s: %s (K = %d, n = N / K = %.4g)", run, verdict["verdict_text"].iloc[0], head["K"], head["n"])
    return comparison, verdict
