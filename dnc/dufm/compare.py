"""Measured DUFM solutions against the closed-form theory (docs/theory.md sections 2-4).

compare_run() returns a long comparison table (one row per checked quantity: measured, predicted,
gaps, tolerance, pass) and a one-row verdict. Predictions that the theory does not pin (the H_1
class-mean angle, the layer-2 pre-activation geometry, see docs/theory.md section 3) appear with
predicted = NaN and note "not pinned"; what is pinned there (DNC1, equal norms, cosine <= 0) is
checked instead.

The verdict row also classifies the run by the rank of its class means (rank_verdict, Súkeník et
al. 2024; docs/theory.md section 4), next to the loss-based verdict code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dnc.layout import dufm_columns
from dnc.theory import DNCOptimum, dnc_optimum, local_minimum_structure, triangle_loss

__all__ = ["Tolerances", "compare_run", "diverged_run", "empty_comparison", "is_diverged", "is_converged",
           "rank_columns",
           "rank_verdict", "VERDICTS", "RANK_VERDICTS", "COMPARISON_COLUMNS"]

# Columns of the comparison table (docs/schemas.md), with their dtypes for an empty table.
COMPARISON_COLUMNS = {"run": "string", "quantity": "string", "layer": "int64", "representation": "string",
                      "measured": "float64", "predicted": "float64", "abs_gap": "float64",
                      "rel_gap": "float64", "tolerance": "float64", "pass": "boolean", "note": "string"}

VERDICTS = {
    "global_optimum": "agrees with the global optimum",
    "dnc": "at the DNC solution (L_DNC); not proven optimal for K >= 3, L >= 3",
    "dnc_local_minimum": "at a DNC-shaped local minimum (zero is optimal)",
    "below_dnc_low_rank": "below DNC (low-rank solution)",
    "above_dnc": "above L_DNC at another stationary point",
    "not_converged": "not converged",
    "diverged": "diverged (non-finite loss)",
}

RANK_VERDICTS = ("dnc", "low-rank", "other", "diverged")


@dataclass(frozen=True)
class Tolerances:
    """Thresholds of the comparison.

    loss_rtol: relative loss gap counted as agreement. structure_rtol: relative gap of norms,
    penalties and singular values. collapse_atol: bound on NC1 (a ratio of variances, i.e. a
    squared distance) where 0 is predicted. geometry_atol: bound on NC2/NC3 (unsquared Frobenius
    distances) where 0 is predicted; near a minimum the loss gap scales like their square, so
    geometry_atol ~ sqrt(loss_rtol) is the consistent choice.
    grad_norm: a run is converged when its final gradient norm is below this, or when its loss
    changed by less than plateau_rtol (relative) over the last quarter of its history.
    """

    loss_rtol: float = 1e-6
    structure_rtol: float = 1e-3
    collapse_atol: float = 1e-6
    geometry_atol: float = 1e-3
    grad_norm: float = 1e-6
    plateau_rtol: float = 1e-7


def is_converged(history: pd.DataFrame, tol: Tolerances) -> bool:
    """Final gradient norm below tol.grad_norm, or a plateau over the last quarter of history."""
    last = history.iloc[-1]
    if last["grad_norm"] < tol.grad_norm:
        return True
    late = history[history["step"] >= 0.75 * last["step"]]
    if len(late) < 2:
        return False
    change = abs(late["loss"].iloc[0] - last["loss"]) / abs(last["loss"])
    return bool(change < tol.plateau_rtol)


def _row(quantity, layer, rep, measured, predicted, tol, note="", mode="rel"):
    gap = measured - predicted if np.isfinite(predicted) else math.nan
    rel = abs(gap) / abs(predicted) if np.isfinite(predicted) and predicted != 0 else math.nan
    if not np.isfinite(predicted):
        ok = None
    elif mode == "rel":
        ok = bool(rel <= tol)
    elif mode == "le":
        ok = bool(measured <= predicted + tol)
    else:
        ok = bool(abs(gap) <= tol)
    return {"quantity": quantity, "layer": layer, "representation": rep, "measured": measured,
            "predicted": predicted, "abs_gap": gap, "rel_gap": rel, "tolerance": tol,
            "pass": ok, "note": note}


def _metric(metrics: pd.DataFrame, layer: int, rep: str, name: str) -> float:
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
    return [(l, r, _metric(metrics, l, r, "rank_means")) for l, r in reps]


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
    """The verdict columns of the rank analysis, in their order: loss_over_L_DNC, loss_over_L_tri,
    min_hidden_rank (= post), min_hidden_rank_pre, min_hidden_rank_post (smallest rank_means over
    layers 2..L) and rank_verdict()'s columns. L_DNC may be NaN and L_tri None (no theory)."""
    hidden = {rep: _nanmin([_metric(metrics, l, rep, "rank_means") for l in range(2, L + 1)])
              for rep in ("pre", "post")}
    return {"loss_over_L_DNC": loss / L_DNC if L_DNC > 0 else math.nan,
            "loss_over_L_tri": loss / L_tri if L_tri else math.nan,
            "min_hidden_rank": hidden["post"], "min_hidden_rank_pre": hidden["pre"],
            "min_hidden_rank_post": hidden["post"], **rank_verdict(K, L, loss, L_DNC, metrics, tol)}


def _structure_rows(opt: DNCOptimum, L: int, final: Mapping[str, float], metrics: pd.DataFrame,
                    weights: Mapping[int, np.ndarray], tol: Tolerances) -> list[dict]:
    """Penalties, class-mean norms, collapse metrics and weight spectra against opt."""
    rows = [_row("fit", 0, "", final["fit"], opt.fit, tol.structure_rtol,
                 "(1 - c*)^2 / 2", mode="abs" if opt.fit < 1e-12 else "rel")]
    pens = [2 * final["reg_H1"]] + [2 * final[f"reg_W{l}"] for l in range(1, L + 1)]
    for i, p in enumerate(pens):
        name = "lambda_H1 ||H_1||^2" if i == 0 else f"lambda_W{i} ||W_{i}||^2"
        rows.append(_row(name, i, "", p, opt.penalty, tol.structure_rtol, "K tau"))
    rows.append(_row("penalty balance max/min - 1", 0, "", max(pens) / min(pens) - 1, 0.0,
                     tol.structure_rtol, "all lambda ||.||^2 equal", mode="abs"))
    for layer, rep in dufm_columns(L):
        rows.append(_row("nc1_pinv", layer, rep, _metric(metrics, layer, rep, "nc1_pinv"), 0.0,
                         tol.collapse_atol, "DNC1", mode="abs"))
        pinned = not (layer == 1 or (layer == 2 and rep == "pre"))
        if pinned:
            rows.append(_row("nc2_orth", layer, rep, _metric(metrics, layer, rep, "nc2_orth"),
                             0.0, tol.geometry_atol, "DNC2: orthogonal equal-norm means",
                             mode="abs"))
        else:
            rows.append(_row("nc2_orth", layer, rep, _metric(metrics, layer, rep, "nc2_orth"),
                             math.nan, 0.0, "not pinned (flat family, docs/theory.md s3)"))
            rows.append(_row("mean_norm_spread", layer, rep,
                             _metric(metrics, layer, rep, "mean_norm_spread"), 0.0,
                             tol.structure_rtol, "equal class-mean norms", mode="abs"))
            rows.append(_row("max_cos_uncentred", layer, rep,
                             _metric(metrics, layer, rep, "max_cos_uncentred"), 0.0,
                             tol.structure_rtol, "class-mean cosines <= 0", mode="le"))
    # Class-mean norms: a (H_1), s_l (post-ReLU layer l), c* (output).
    norm_reps = [(l, r) for l, r in dufm_columns(L) if r != "pre"]
    for (layer, rep), pred in zip(norm_reps, opt.mean_norms):
        rows.append(_row("class-mean norm", layer, rep, _metric(metrics, layer, rep, "mean_norm"),
                         pred, tol.structure_rtol, "a, s_l, c*"))
    # DNC3: rows of W_l in span of its input means (l >= 2); W_L proportional to M_L^T.
    for l in range(2, L + 1):
        rows.append(_row("nc3_span", l, "post", _metric(metrics, l, "post", "nc3_span"), 0.0,
                         tol.geometry_atol, f"DNC3: row space of W_{l} in span(M_{l})",
                         mode="abs"))
    rows.append(_row("nc3_uncentred", L, "post", _metric(metrics, L, "post", "nc3_uncentred"),
                     0.0, tol.geometry_atol, "DNC3: W_L proportional to M_L^T", mode="abs"))
    for l, pred in zip(range(2, L + 1), opt.weight_singular_values):
        if l in weights:
            sv = np.linalg.svd(weights[l], compute_uv=False)[: opt.K]
            for i, v in enumerate(sv, start=1):
                rows.append(_row(f"sigma_{i}(W_{l})", l, "", float(v), pred, tol.structure_rtol,
                                 "K equal singular values s_{l+1}/s_l"))
    return rows


def compare_run(
    run: str,
    settings: Mapping,
    history: pd.DataFrame,
    metrics: pd.DataFrame,
    weights: Mapping[int, np.ndarray],
    tol: Tolerances = Tolerances(),
    converged: bool | None = None,
    always_structure: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Theory vs measurement for one DUFM run.

    Args:
        settings: resolved run settings (K, L, n, lambda_H1, lambda_W, ...).
        history: the run's training history (step, loss, fit, reg_H1, reg_W1.., grad_norm).
        metrics: the run's tidy metrics (layer, representation, metric, value).
        weights: layer -> W_l.
        converged: override the convergence test on the history (trained networks).
        always_structure: compare the per-layer structure with the DNC optimum even when the
            loss does not agree (trained networks: how far each layer is from the prediction).

    Returns:
        (comparison, verdict): comparison has one row per checked quantity; verdict one row with,
        besides the verdict code: loss_over_L_DNC, loss_over_L_tri (NaN where L_tri is undefined:
        K not C(r, 2) with r >= 5, or L < 3), min_hidden_rank_pre / min_hidden_rank_post (smallest
        rank_means over layers 2..L before / after the ReLU; min_hidden_rank is the post one) and
        the rank classification of rank_verdict() (rank_verdict, rank_verdict_text, deciding_*).
    """
    # n stays a float for networks with N / K not an integer: P = n lambda_H1 ... needs the exact N / K.
    K, L, n = int(settings["K"]), int(settings["L"]), settings["n"]
    opt = dnc_optimum(K, L, n, settings["lambda_H1"], settings["lambda_W"])
    final = history.iloc[-1].to_dict()
    loss = float(final["loss"])
    converged = is_converged(history, tol) if converged is None else converged
    rows = [_row("loss vs L_DNC", 0, "", loss, opt.loss, tol.loss_rtol, "closed form")]
    local = opt.local_loss if opt.zero_optimal and opt.local_loss is not None else None
    if local is not None:
        rows.append(_row("loss vs DNC local minimum", 0, "", loss, local, tol.loss_rtol,
                         "g(c) at the largest stationary c"))
    l_tri = triangle_loss(K, L, n, settings["lambda_H1"], settings["lambda_W"])
    if l_tri is not None:
        rows.append(_row("loss vs L_tri", 0, "", loss, l_tri, tol.loss_rtol,
                         "triangle construction (an upper bound on the optimum)"))
    gap = (loss - opt.loss) / opt.loss
    # A loss below L_DNC is a certificate on its own (DNC is not optimal), converged or not.
    if gap < -tol.loss_rtol and not opt.zero_optimal:
        code = "below_dnc_low_rank"
    elif not converged:
        code = "not_converged"
    elif abs(gap) <= tol.loss_rtol:
        code = "global_optimum" if (K == 2 or L <= 2 or opt.zero_optimal) else "dnc"
    elif local is not None and abs(loss - local) / local <= tol.loss_rtol:
        code = "dnc_local_minimum"
    else:
        code = "above_dnc"
    ref = None
    if code in ("global_optimum", "dnc") and not opt.zero_optimal:
        ref = opt
    elif code == "dnc_local_minimum":
        ref = local_minimum_structure(opt)
    elif always_structure and not opt.zero_optimal:
        ref = opt
    if ref is not None:
        rows += _structure_rows(ref, L, final, metrics, weights, tol)
    comparison = pd.DataFrame(rows)
    comparison.insert(0, "run", run)
    structural = comparison[~comparison["quantity"].str.startswith("loss")]
    checked = structural["pass"].dropna()
    verdict = pd.DataFrame([{
        "run": run,
        "verdict": code,
        "verdict_text": VERDICTS[code] if code != "not_converged"
        else f"not converged (loss {gap:+.2e} relative to L_DNC)",
        "converged": converged,
        "steps": int(final["step"]),
        "final_loss": loss,
        "final_grad_norm": float(final["grad_norm"]),
        "L_DNC": opt.loss,
        "rel_gap": gap,
        "c_star": opt.scale,
        "P": opt.P,
        "threshold": opt.threshold,
        "regime": opt.regime,
        "local_min_loss": opt.local_loss if opt.zero_optimal else math.nan,
        "L_tri": l_tri if l_tri is not None else math.nan,
        **rank_columns(K, L, loss, opt.loss, l_tri, metrics, tol),
        "structure_checks": int(len(checked)),
        "structure_failed": int((~checked.astype(bool)).sum()),
    }])
    return comparison, verdict


def is_diverged(history: pd.DataFrame) -> bool:
    """True when the last history row has a non-finite loss or gradient norm (the trainer stops a
    diverged run there, dnc.dufm.train.train_dufm_batch with on_nonfinite="stop")."""
    last = history.iloc[-1]
    return not (np.isfinite(last["loss"]) and np.isfinite(last["grad_norm"]))


def diverged_run(run: str, settings: Mapping, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The comparison (empty) and verdict of a run whose loss became NaN or inf.

    Divergence is a result (too large a learning rate), not a failed job: the verdict is "diverged",
    steps is the logged step where the loss was first seen non-finite, final_loss the last finite
    loss before it (NaN if none) and the theory's columns (L_DNC, c_star, ...) are filled so the run
    can be set against them; nothing is measured on the non-finite parameters.
    """
    K, L, n = int(settings["K"]), int(settings["L"]), settings["n"]
    opt = dnc_optimum(K, L, n, settings["lambda_H1"], settings["lambda_W"])
    l_tri = triangle_loss(K, L, n, settings["lambda_H1"], settings["lambda_W"])
    step = int(history["step"].iloc[-1])
    finite = history[np.isfinite(history["loss"]) & np.isfinite(history["grad_norm"])]
    last_loss = float(finite["loss"].iloc[-1]) if len(finite) else math.nan
    what = "loss" if not np.isfinite(history["loss"].iloc[-1]) else "gradient norm"
    text = (f"diverged: non-finite {what} at step {step} (last finite loss {last_loss:.6g}); "
            f"lr {settings.get('lr')}")
    verdict = pd.DataFrame([{
        "run": run, "verdict": "diverged", "verdict_text": text, "converged": False, "steps": step,
        "final_loss": last_loss, "final_grad_norm": float(history["grad_norm"].iloc[-1]),
        "L_DNC": opt.loss, "rel_gap": math.nan, "c_star": opt.scale, "P": opt.P,
        "threshold": opt.threshold, "regime": opt.regime,
        "local_min_loss": opt.local_loss if opt.zero_optimal else math.nan,
        "L_tri": l_tri if l_tri is not None else math.nan,
        "loss_over_L_DNC": math.nan, "loss_over_L_tri": math.nan, "min_hidden_rank": math.nan,
        "min_hidden_rank_pre": math.nan, "min_hidden_rank_post": math.nan,
        "rank_verdict": "diverged", "rank_verdict_text": text, "deciding_rank": math.nan,
        "deciding_layer": math.nan, "deciding_representation": "",
        "structure_checks": 0, "structure_failed": 0,
    }])
    return empty_comparison(), verdict


def empty_comparison() -> pd.DataFrame:
    """A comparison table with no rows and the columns and dtypes of compare_run's."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COMPARISON_COLUMNS.items()})
