"""Training loss in units that do not depend on the recipe, and the measured epochs at matched
training loss (docs/agop.md, "Matched training loss").

Recipes report train_loss (the history's mean over training samples of the per-sample loss, without
penalties, dnc.nets.epoch.sample_loss) in different units: loss "mse" (one-hot targets) or "mse_pm1"
(+1/-1 targets), loss_reduction "half_sum" ((1/2)||z - t||^2 per sample) or "mean" ((1/K)||z - t||^2,
so the batch mean is nn.MSELoss). The relative train error

    e = ||Z - T||_F^2 / ||T||_F^2        (Z, T: the (N, K) outputs and targets of the training split)

is the same number for the same outputs and targets whatever the reduction:
||Z - T||_F^2 = 2 N train_loss (half_sum) or N K train_loss (mean), and ||T||_F^2 = N (one-hot) or
N K (+1/-1). Cross-entropy runs have no targets T: not applicable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

__all__ = ["THRESHOLDS", "error_per_loss", "relative_train_error", "matched_epochs"]

# Relative train errors at which the report compares recipes: 10 %, 1 % and 0.1 % of ||T||_F^2.
THRESHOLDS = (1e-1, 1e-2, 1e-3)


def _setting(settings: Mapping[str, Any] | Any, key: str, default: str) -> str:
    """settings[key] of a resolved run (a mapping, e.g. dnc.config's or a config-frame row) or the
    attribute of a NetConfig; the NetConfig default when absent."""
    value = settings.get(key) if isinstance(settings, Mapping) else getattr(settings, key, None)
    return default if value is None else str(value)


def error_per_loss(settings: Mapping[str, Any] | Any, num_classes: int) -> float | None:
    """c with ||Z - T||_F^2 / ||T||_F^2 = c * train_loss for the run's loss and loss_reduction.

    Args:
        settings: the run's loss ("mse", "mse_pm1" or "ce") and loss_reduction ("half_sum" or
            "mean"; default "half_sum"), as a mapping or a NetConfig.
        num_classes: K, the number of outputs.

    Returns:
        2 (mse, half_sum), 2/K (mse_pm1, half_sum), K (mse, mean), 1 (mse_pm1, mean); None for ce.
    """
    loss = _setting(settings, "loss", "mse")
    reduction = _setting(settings, "loss_reduction", "half_sum")
    if loss == "ce":
        return None
    if loss not in ("mse", "mse_pm1") or reduction not in ("half_sum", "mean"):
        raise ValueError(f"unknown loss {loss!r} or loss_reduction {reduction!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    squared_per_loss = 2.0 if reduction == "half_sum" else float(num_classes)  # ||z - t||^2 per unit
    target_norm = 1.0 if loss == "mse" else float(num_classes)  # ||t||^2 of every sample
    return squared_per_loss / target_norm


def relative_train_error(history: pd.DataFrame, settings: Mapping[str, Any] | Any,
                         num_classes: int) -> pd.Series:
    """||Z - T||_F^2 / ||T||_F^2 of the training split after every epoch of a history.

    Args:
        history: a network's history (columns epoch, train_loss; docs/schemas.md), one run.
        settings, num_classes: as in error_per_loss.

    Returns:
        float Series indexed by epoch (the history's order); a diverged run's last row stays
        non-finite. Raises ValueError for a cross-entropy run (no targets: not applicable).
    """
    scale = error_per_loss(settings, num_classes)
    if scale is None:
        raise ValueError("relative train error: not applicable to a cross-entropy run (no targets T)")
    return pd.Series(history["train_loss"].to_numpy(float) * scale,
                     index=pd.Index(history["epoch"].astype(int), name="epoch"), name="rel_train_error")


def matched_epochs(history: pd.DataFrame, epochs_measured: Iterable[int], settings: Mapping[str, Any] | Any,
                   thresholds: Iterable[float] = THRESHOLDS, *, num_classes: int) -> pd.DataFrame:
    """For each threshold, the first measured epoch whose relative train error is below it.

    Args:
        history: the run's history (epoch, train_loss).
        epochs_measured: the epochs with measurements (feature or analysis epochs). An epoch with no
            history row, such as 0 (the initialisation: the loss is measured after each epoch),
            is never matched.
        settings, num_classes: as in error_per_loss.
        thresholds: relative train errors, in the order of the returned rows.

    Returns:
        DataFrame with one row per threshold: threshold, epoch (Int64, <NA> when no measured epoch
        reaches it) and rel_train_error at that epoch (NaN when none). ValueError for ce runs.
    """
    error = relative_train_error(history, settings, num_classes)
    error = error[~error.index.duplicated(keep="last")]  # a resumed history repeats no epoch, but be safe
    measured = sorted({int(e) for e in epochs_measured} & set(error.index))
    rows = []
    for t in thresholds:
        hit = next((e for e in measured if math.isfinite(error[e]) and error[e] < t), None)
        rows.append({"threshold": float(t), "epoch": hit,
                     "rel_train_error": math.nan if hit is None else float(error[hit])})
    return pd.DataFrame(rows, columns=["threshold", "epoch", "rel_train_error"]).astype(
        {"threshold": "float64", "epoch": "Int64", "rel_train_error": "float64"})
