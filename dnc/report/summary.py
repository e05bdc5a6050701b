"""The report's tidy summary: every metric row joined with its run's config and verdict, so one
query answers "how does NC1 at layer 3 depend on lambda" (docs/schemas.md)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pandas as pd

from dnc.theory import lambda_vector

__all__ = ["config_frame", "net_config_frame", "model_config_frame", "summary_table", "MODEL_CONFIG_COLUMNS"]

# Settings of a model experiment carried into the summary (checkpoint paths, batch size and
# max_width are how it was run, not what was measured).
MODEL_CONFIG_COLUMNS = ["model", "kwargs", "dataset", "layers", "classifier", "pool", "init", "seed",
                        "experiment"]


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


def _text(v: object) -> object:
    """A list as comma-separated text, a dict as JSON with sorted keys; scalars and None as they are."""
    if isinstance(v, Mapping):
        return json.dumps(dict(v), sort_keys=True, default=str)
    if isinstance(v, list | tuple):
        return ",".join(map(str, v))
    return v


def model_config_frame(runs: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per model experiment (run id = experiment name): run and MODEL_CONFIG_COLUMNS, with
    kwargs as JSON text, layers as comma-separated node names (or "auto") and pool as its name or,
    per layer, JSON text."""
    rows = [{"run": rid, **{k: (json.dumps(dict(s.get(k) or {}), sort_keys=True, default=str) if k == "kwargs"
                                else _text(s.get(k))) for k in MODEL_CONFIG_COLUMNS}}
            for rid, s in runs.items()]
    return pd.DataFrame(rows, columns=["run", *MODEL_CONFIG_COLUMNS])
