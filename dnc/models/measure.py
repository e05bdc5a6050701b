"""Metrics of a model experiment's feature files (every checkpoint step, train and test): the tidy
table of every other run (dnc.metrics.streaming.files_metrics), plus the graph node name of each
layer (column ``node``) and the model's accuracy per (step, split) when it predicts classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dnc.io import read_layout, read_metadata
from dnc.metrics import Convention
from dnc.metrics.streaming import files_metrics

__all__ = ["model_metrics", "accuracy_rows", "node_names"]


def node_names(path: str | os.PathLike) -> dict[int, str]:
    """layer (1-based position in the chosen layers) -> graph node name, from the feature file's
    ``dnc:nodes`` metadata."""
    return {int(k): str(v) for k, v in read_metadata(path, "dnc:nodes").items()}


def accuracy_rows(path: str | os.PathLike, run: str) -> list[dict]:
    """One tidy row (metric "accuracy") of a feature file with a ``prediction`` column: the share of
    predictions equal to the label, on the layer that feeds the classifier (else the last layer)."""
    names = pq.read_schema(path).names
    if "prediction" not in names:
        return []
    t = pq.read_table(path, columns=["label", "prediction"])
    acc = float(np.mean(t.column("label").to_numpy() == t.column("prediction").to_numpy()))
    layout = read_layout(path)
    fed = [c for c in layout if c.weight is not None] or layout[-1:]
    step = int(read_metadata(path, "dnc:step"))
    split = str(read_metadata(path, "dnc:split"))
    return [{"run": run, "layer": fed[-1].layer, "representation": fed[-1].representation,
             "split": split, "step": step, "metric": "accuracy", "value": acc}]


def model_metrics(features: Sequence[str | os.PathLike], weights: Sequence[str | os.PathLike], run: str,
                  convention: Convention = Convention(), batch_rows: int | None = None,
                  device: str = "auto") -> pd.DataFrame:
    """Tidy metrics of the listed feature files (each paired with the weights file of its step),
    with a ``node`` column and the accuracy rows."""
    table = files_metrics(list(features), list(weights), run=run, convention=convention,
                          batch_rows=batch_rows, device=device)
    acc = [row for f in features for row in accuracy_rows(f, run)]
    if acc:
        table = pd.concat([table, pd.DataFrame(acc).assign(convention=table["convention"].iloc[0])],
                          ignore_index=True)
    nodes = node_names(features[0])
    table["node"] = table["layer"].map(nodes).astype("string")
    return table
