"""Helpers shared by the report's sections: grouping runs by grid point, thinning long lists,
drawing a centre line with its spread, the class-mean spectra as a table, and the caps on how much
one figure or table shows."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

__all__ = ["COMPARISON_COLS", "MAX_LINES", "MAX_GROUPS", "MAX_ROWS", "run_groups", "pick", "band", "sv_frame"]

# Columns of a comparison table (dnc.dufm.compare.COMPARISON_COLUMNS) as the per-run tables show them.
COMPARISON_COLS = ["quantity", "layer", "representation", "measured", "predicted", "rel_gap", "abs_gap",
                   "tolerance", "pass", "note"]
MAX_LINES = 10  # per-run curves drawn per panel; more runs are aggregated per grid point
MAX_GROUPS = 8  # aggregated curves (grid points, or experiment and width) per panel
MAX_ROWS = 30  # longer per-run tables go inside a <details>


def run_groups(config: pd.DataFrame) -> pd.Series:
    """Run id -> its grid point without the seed ('width30', 'lambda0.004-width30'; the experiment
    name when it has no grid): the seeds of one grid point form one group."""
    labels = [re.sub(r"(^|-)s\d+$", "", rid.removeprefix(exp + "-")) or exp
              for rid, exp in zip(config["run"], config["experiment"])]
    return pd.Series(labels, index=config["run"].to_numpy())


def pick(items: list, cap: int) -> list:
    """At most cap items, evenly spread over the list (first and last kept)."""
    if len(items) <= cap:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, cap).round().astype(int))]


def band(ax, x, Y, label: str | None = None, spread: str = "range", **kw) -> None:
    """Centre line of the rows of Y (runs x points, NaN allowed) with a shaded spread: median and
    min..max (spread='range') or mean and +-1 std (spread='std')."""
    Y = np.asarray(Y, float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if spread == "std":
            mid, sd = np.nanmean(Y, 0), np.nanstd(Y, 0)
            lo, hi = mid - sd, mid + sd
        else:
            mid, lo, hi = np.nanmedian(Y, 0), np.nanmin(Y, 0), np.nanmax(Y, 0)
    (line,) = ax.plot(x, mid, label=label, **kw)
    if len(Y) > 1:
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)


def sv_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """Class-mean singular values of the hidden layers (pre and post): run, layer, representation,
    i, value and rel = value / sigma_1 (NaN where sigma_1 = 0)."""
    sv = metrics[metrics["metric"].str.startswith("sv_means_")
                 & metrics["representation"].isin(["pre", "post"])].copy()
    sv["i"] = sv["metric"].str.removeprefix("sv_means_").astype(int)
    top = sv[sv["i"] == 1].set_index(["run", "layer", "representation"])["value"]
    first = top.reindex(pd.MultiIndex.from_frame(sv[["run", "layer", "representation"]])).to_numpy()
    sv["rel"] = sv["value"].to_numpy(float) / np.where(first > 0, first, np.nan)
    return sv[["run", "layer", "representation", "i", "value", "rel"]]
