"""The report's tidy summary: every metric row joined with its run's config and verdict, so one
query answers "how does NC1 at layer 3 depend on lambda" (docs/schemas.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from dnc.theory import lambda_vector

__all__ = ["config_frame", "net_config_frame", "summary_table"]


def config_frame(runs: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per run with its resolved settings as scalar columns.

    lambda_W is a float when every layer has the same decay (NaN otherwise); the per-layer values
    are in lambda_W_per_layer as comma-separated text.
    """
    rows = []
    for rid, s in runs.items():
        lws = lambda_vector(s["lambda_W"], int(s["L"]), allow_zero=True)
        row = {"run": rid, **{k: v for k, v in s.items() if k not in ("lambda_W", "grid")}}
        row["lambda_W"] = float(lws[0]) if len(set(lws)) == 1 else math.nan
        row["lambda_W_per_layer"] = ",".join(f"{v:g}" for v in lws)
        row["init_std"] = math.nan if s.get("init_std") is None else float(s["init_std"])
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(config: pd.DataFrame, metrics: pd.DataFrame,
                  verdicts: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy metrics with each run's config and verdict columns joined on 'run' (Deep RFM runs have
    no verdict: pass None)."""
    out = metrics.merge(config, on="run", how="left")
    if verdicts is not None:
        keep = ["run", "verdict", "L_DNC", "final_loss", "rel_gap", "c_star", "regime", "converged"]
        out = out.merge(verdicts[keep], on="run", how="left")
    return out


def net_config_frame(runs: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per network run with scalar config columns (lists as comma-separated text)."""
    rows = []
    for rid, s in runs.items():
        row = {"run": rid}
        for k, v in s.items():
            if k == "grid":
                continue
            row[k] = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) \
                if isinstance(v, list | tuple) else v
        rows.append(row)
    return pd.DataFrame(rows)
