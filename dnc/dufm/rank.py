"""The rank verdict of a DUFM run (Súkeník et al. 2024; docs/theory.md section 4): DNC, low-rank or
other, from the class-mean ranks of its hidden layers and its loss against L_DNC.

rank_columns() gives the verdict table's RANK_COLUMNS (dnc.dufm.verdict), rank_verdict() the
classification itself.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dnc.dufm.verdict import DIVERGED, RANK_COLUMNS, Tolerances

__all__ = ["rank_verdict", "rank_columns", "diverged_rank_columns", "metric_value"]


def metric_value(metrics: pd.DataFrame, layer: int, rep: str, name: str) -> float:
    """The value of metric name at (layer, representation) of a run's tidy metrics; NaN if absent."""
    sel = metrics[(metrics["layer"] == layer) & (metrics["representation"] == rep)
                  & (metrics["metric"] == name)]
    return float(sel["value"].iloc[0]) if len(sel) else math.nan


def _nanmin(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return min(finite) if finite else math.nan


def _ranks(metrics: pd.DataFrame, L: int) -> list[tuple[int, str, float]]:
    """(layer, representation, rank_means) of the hidden representations that DNC pins to rank K:
    pre-activations of layers 3..L, then post-activations of layers 2..L (layer-2 pre-activations
    are a flat family at DNC, rank K - 1 or K: docs/theory.md section 3)."""
    reps = [(l, "pre") for l in range(3, L + 1)] + [(l, "post") for l in range(2, L + 1)]
    return [(l, r, metric_value(metrics, l, r, "rank_means")) for l, r in reps]


def rank_verdict(K: int, L: int, loss: float, L_DNC: float, metrics: pd.DataFrame,
                 tol: Tolerances = Tolerances()) -> dict:
    """Classify a run by its class-mean ranks: "dnc", "low-rank" or "other".

    The ranks used are rank_means (#{sigma_i(M) > means_rank_rtol sigma_1}) of the pre-activations
    of layers 3..L and the post-activations of layers 2..L; the deciding rank is the smallest of
    them (the first in that order among equals, so a pre-activation wins a tie).

    - "dnc": |loss - L_DNC| <= loss_rtol L_DNC and every one of those ranks equals K;
    - "low-rank": loss < (1 - loss_rtol) L_DNC and the deciding rank is below K;
    - "other": anything else (above L_DNC, below it at full rank, no ranks, L_DNC NaN).

    Convergence is not needed: a loss below L_DNC is itself a certificate. Returns rank_verdict,
    rank_verdict_text (e.g. "low-rank: rank 5 < K = 10 at layer 3 (pre), loss 0.85 L_DNC"),
    deciding_rank, deciding_layer and deciding_representation.
    """
    ranks = [x for x in _ranks(metrics, L) if np.isfinite(x[2])]
    ratio = loss / L_DNC if L_DNC > 0 else math.nan  # NaN also when L_DNC is NaN (no theory)
    layer, rep, rank = min(ranks, key=lambda x: x[2]) if ranks else (math.nan, "", math.nan)
    at = f"at layer {layer} ({rep})"
    gap = abs(ratio - 1) <= tol.loss_rtol
    if not ranks:
        code, text = "other", "other: no class-mean rank measured"
    elif not np.isfinite(ratio):
        code, text = "other", f"other: no L_DNC to compare with, smallest rank {rank:.0f} (K = {K}) {at}"
    elif gap and rank == K:
        code, text = "dnc", f"dnc: rank K = {K} at every hidden layer, loss at L_DNC ({ratio - 1:+.1e})"
    elif ratio < 1 - tol.loss_rtol and rank < K:
        code, text = "low-rank", f"low-rank: rank {rank:.0f} < K = {K} {at}, loss {ratio:.4f} L_DNC"
    else:
        where = "at" if gap else ("below" if ratio < 1 else "above")
        code = "other"
        text = f"other: loss {ratio:.4f} L_DNC ({where}), smallest rank {rank:.0f} (K = {K}) {at}"
    return {"rank_verdict": code, "rank_verdict_text": text, "deciding_rank": rank,
            "deciding_layer": layer, "deciding_representation": rep}


def rank_columns(K: int, L: int, loss: float, L_DNC: float, L_tri: float | None, metrics: pd.DataFrame,
                 tol: Tolerances = Tolerances()) -> dict:
    """The verdict columns of the rank analysis (RANK_COLUMNS), in their order: loss_over_L_DNC,
    loss_over_L_tri, min_hidden_rank (= post), min_hidden_rank_pre, min_hidden_rank_post (smallest
    rank_means over layers 2..L) and rank_verdict()'s columns. L_DNC may be NaN and L_tri None (no
    theory)."""
    hidden = {rep: _nanmin([metric_value(metrics, l, rep, "rank_means") for l in range(2, L + 1)])
              for rep in ("pre", "post")}
    return {"loss_over_L_DNC": loss / L_DNC if L_DNC > 0 else math.nan,
            "loss_over_L_tri": loss / L_tri if L_tri else math.nan,
            "min_hidden_rank": hidden["post"], "min_hidden_rank_pre": hidden["pre"],
            "min_hidden_rank_post": hidden["post"], **rank_verdict(K, L, loss, L_DNC, metrics, tol)}


def diverged_rank_columns(text: str) -> dict:
    """RANK_COLUMNS of a diverged run: nothing measured (NaN, no deciding representation), rank
    verdict DIVERGED with the divergence text."""
    return {**dict.fromkeys(RANK_COLUMNS, math.nan), "rank_verdict": DIVERGED, "rank_verdict_text": text,
            "deciding_representation": ""}
