"""He & Su's law of data separation (PNAS 2023): in a trained classifier the separation fuzziness
D_l = tr(Sigma_W Sigma_B^+) of layer l decays geometrically with depth, log D_l = a - rho * l, so
that every layer divides D by the same factor exp(rho).

`separation_fit` fits that line by least squares over the measured layers of each (run, step,
split) of a tidy metrics table (docs/schemas.md), all groups at once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnc.layout import MODEL_REPRESENTATIONS

__all__ = ["SEPARATION_COLUMNS", "MIN_LAYERS", "separation_fit"]

SEPARATION_COLUMNS = ["run", "step", "split", "layers", "skipped", "rho", "ratio", "corr", "intercept"]
MIN_LAYERS = 3  # a line through two points fits exactly (|corr| = 1): no evidence for the law
_KEYS = ["run", "step", "split"]


def separation_fit(metrics: pd.DataFrame, metric: str = "he_su_D",
                   representation: str | None = MODEL_REPRESENTATIONS[0]) -> pd.DataFrame:
    """Least-squares fit of log D_l = intercept - rho * l per (run, step, split).

    Args:
        metrics: tidy metrics (run, layer, representation, split, step, metric, value, ...); the
            rows of `metric` give D per layer, one row per (run, step, split, layer). The x of the
            fit is the `layer` column itself (a skipped layer leaves a gap, it does not shift the
            layers after it).
        metric: the separation measure (He & Su's D is `he_su_D`, tr(Sigma_W Sigma_B^+) with
            class-count weighting).
        representation: keep only rows of this representation when the table has that column
            ("node" for the layers of a model experiment); None keeps every row.

    Returns:
        One row per (run, step, split) with a row of `metric`, columns SEPARATION_COLUMNS: layers
        (layers used: D finite and > 0), skipped (layers whose D is <= 0 or not finite: log D is
        undefined there), rho (decay rate per layer), ratio = exp(-rho) (the factor by which one
        layer multiplies D), corr (Pearson correlation of log D with l; -1 for an exactly geometric
        decay), intercept (a). rho, ratio, corr and intercept are NaN with fewer than MIN_LAYERS
        usable layers; corr is NaN when log D is constant (no correlation is defined).
    """
    sel = metrics[metrics["metric"] == metric]
    if representation is not None and "representation" in sel:
        sel = sel[sel["representation"] == representation]
    if sel.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            SEPARATION_COLUMNS, ["object", "int64", "object", "int64", "int64", *["float64"] * 4])})
    D = sel["value"].to_numpy(float)
    ok = np.isfinite(D) & (D > 0)
    keys = sel[_KEYS].reset_index(drop=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(ok, np.log(np.where(ok, D, 1.0)), np.nan)
    x = np.where(ok, sel["layer"].to_numpy(float), np.nan)
    frame = keys.assign(x=x, y=y, used=ok.astype(np.int64), skipped=(~ok).astype(np.int64))
    groups = frame.groupby(_KEYS, sort=True)
    # Centred sums (two passes: means first) keep the fit exact to rounding when log D is large
    # against its spread across layers, where the raw-moment formula would cancel digits.
    means = groups[["x", "y"]].transform("mean")  # NaN rows (skipped layers) are left out
    dx, dy = frame["x"] - means["x"], frame["y"] - means["y"]
    sums = frame[_KEYS].assign(sxx=dx * dx, syy=dy * dy, sxy=dx * dy).groupby(_KEYS, sort=True).sum()
    counts = groups[["used", "skipped"]].sum()
    mean_xy = groups[["x", "y"]].mean()
    n = counts["used"].to_numpy()
    sxx, syy, sxy = (sums[c].to_numpy() for c in ("sxx", "syy", "sxy"))
    enough = n >= MIN_LAYERS
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(enough, sxy / sxx, np.nan)
        corr = np.where(enough & (syy > 0), sxy / np.sqrt(sxx * syy), np.nan)
    intercept = mean_xy["y"].to_numpy() - slope * mean_xy["x"].to_numpy()
    out = counts.index.to_frame(index=False).assign(
        layers=n.astype(np.int64), skipped=counts["skipped"].to_numpy().astype(np.int64),
        rho=-slope, ratio=np.exp(slope), corr=np.clip(corr, -1.0, 1.0), intercept=intercept)
    return out[SEPARATION_COLUMNS]
