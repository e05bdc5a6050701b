"""The Deep RFM stage: a configured run on a prepared dataset, measured with the shared metrics
engine, as tidy tables (docs/rfm.md, docs/schemas.md).

Every layer l has three representations, measured on the train and test splits: ``input`` (X_l
after row normalisation), ``projected`` (X_l S_l, the AGOP projection) and ``mapped``
(Phi(X_l S_l), the next layer's input before its normalisation). Deep RFM has no training steps:
the tidy tables carry step 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from dnc.data import subset
from dnc.device import TORCH_DTYPES, resolve_device
from dnc.layout import RFM_REPRESENTATIONS, FeatureColumn, column_name, rfm_column
from dnc.metrics import Convention, layer_metrics
from dnc.metrics.streaming import TIDY_COLUMNS
from dnc.rfm.deep import RFMLayer, deep_rfm
from dnc.settings import RFMConfig

__all__ = ["select_rows", "run_rfm", "rfm_metrics", "layer_table", "feature_columns"]


def select_rows(X: np.ndarray, y: np.ndarray, n: int | None,
                balanced: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows, or n // K rows of every class when balanced (n None: all rows)."""
    if n is None:
        return X, y
    if n > len(y):
        raise ValueError(f"n = {n} but the split has only {len(y)} rows")
    if balanced:
        K = int(y.max()) + 1
        return subset(X, y, n // K, None)
    return X[:n], y[:n]


def run_rfm(cfg: RFMConfig, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            num_classes: int, progress: bool = True) -> tuple[list[RFMLayer], dict[str, np.ndarray]]:
    """Deep RFM of cfg on (X (n, *shape), y (n,)) train rows, test rows mapped through the same layers.

    Returns the layers and the labels of the rows used, {"train": (n,), "test": (m,)}.
    """
    Xtr, ytr = select_rows(*train, cfg.n, cfg.balanced)
    Xte, yte = select_rows(*test, cfg.test_n, False)
    dev = resolve_device(cfg.device)
    layers = deep_rfm(
        torch.as_tensor(Xtr).reshape(len(Xtr), -1).to(dev), torch.as_tensor(ytr), cfg.depth,
        width=cfg.width,
        feature_map=cfg.feature_map, bandwidth=cfg.bandwidth, ridge=cfg.ridge, agop=cfg.agop,
        seed=cfg.seed, kernel=cfg.kernel, gamma=cfg.gamma,
        X_test=torch.as_tensor(Xte).reshape(len(Xte), -1).to(dev), num_classes=num_classes,
        dtype=TORCH_DTYPES[cfg.dtype], progress=progress)
    return layers, {"train": np.asarray(ytr), "test": np.asarray(yte)}


def _representations(layers: list[RFMLayer]) -> Iterator[tuple[int, str, str, torch.Tensor]]:
    for rec in layers:
        for split, reps in (("train", rec.train), ("test", rec.test)):
            for rep in RFM_REPRESENTATIONS:
                if reps is not None and rep in reps:
                    yield rec.layer, rep, split, reps[rep]


def rfm_metrics(layers: list[RFMLayer], labels: dict[str, np.ndarray], run: str,
                convention: Convention = Convention()) -> pd.DataFrame:
    """Tidy metrics (TIDY_COLUMNS) of every layer, representation and split.

    labels: {"train": (n,), "test": (m,)} classes of the rows the layers hold.
    """
    rows = []
    for layer, rep, split, H in _representations(layers):
        name = f"{run}:{column_name(layer, rep, RFM_REPRESENTATIONS)}:{split}"
        values = layer_metrics(H, labels[split], convention=convention, name=name)
        rows += [{"layer": layer, "representation": rep, "split": split, "metric": k, "value": v}
                 for k, v in values.items()]
    table = pd.DataFrame(rows)
    table.insert(0, "run", run)
    table["step"] = 0
    table["convention"] = convention.describe()
    return table[TIDY_COLUMNS]


def layer_table(layers: list[RFMLayer], run: str) -> pd.DataFrame:
    """One row per layer: run, layer, dim (d_l), width (mapped), seconds, agop_max."""
    return pd.DataFrame([{"run": run, "layer": r.layer, "dim": r.dim, "width": r.width,
                          "seconds": r.seconds, "agop_max": r.agop_max} for r in layers])


def feature_columns(layers: list[RFMLayer], split: str) -> list[tuple[FeatureColumn, np.ndarray]]:
    """(FeatureColumn, (n, d) array) pairs of every layer's representations, for dnc.io.write_features.

    Columns are named by dnc.layout.rfm_column: l<layer>_<input|projected|mapped>.
    """
    return [(rfm_column(layer, rep, H.shape[1]), H.cpu().numpy())
            for layer, rep, s, H in _representations(layers) if s == split]
