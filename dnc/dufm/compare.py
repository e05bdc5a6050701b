"""Measured DUFM solutions against the closed-form theory (docs/theory.md sections 2-4).

compare_run() returns a long comparison table (one row per checked quantity: measured, predicted,
gaps, tolerance, pass) and a one-row verdict. Predictions that the theory does not pin (the H_1
class-mean angle, the layer-2 pre-activation geometry, see docs/theory.md section 3) appear with
predicted = NaN and note "not pinned"; what is pinned there (DNC1, equal norms, cosine <= 0) is
checked instead.

The verdict row (its columns: dnc.dufm.verdict.verdict_row) also classifies the run by the rank
of its class means (dnc.dufm.rank.rank_verdict, Súkeník et al. 2024; docs/theory.md section 4), next
to the loss-based verdict code. Tolerances, VERDICTS, RANK_VERDICTS, rank_verdict and rank_columns
are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from dnc.dufm.rank import diverged_rank_columns, metric_value, rank_columns, rank_verdict
from dnc.dufm.verdict import DIVERGED, RANK_VERDICTS, VERDICTS, Tolerances, theory_columns, verdict_row
from dnc.layout import dufm_columns
from dnc.theory import DNCOptimum, dnc_optimum, lambda_vector, local_minimum_structure, triangle_loss

__all__ = ["Tolerances", "compare_run", "diverged_run", "empty_comparison", "is_diverged", "is_converged",
           "rank_columns", "rank_verdict", "VERDICTS", "RANK_VERDICTS", "COMPARISON_COLUMNS"]

# Columns of the comparison table (docs/schemas.md), with their dtypes for an empty table.
COMPARISON_COLUMNS = {"run": "string", "quantity": "string", "layer": "int64", "representation": "string",
                      "measured": "float64", "predicted": "float64", "abs_gap": "float64",
                      "rel_gap": "float64", "tolerance": "float64", "pass": "boolean", "note": "string"}


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
        rows.append(_row("nc1_pinv", layer, rep, metric_value(metrics, layer, rep, "nc1_pinv"), 0.0,
                         tol.collapse_atol, "DNC1", mode="abs"))
        pinned = not (layer == 1 or (layer == 2 and rep == "pre"))
        if pinned:
            rows.append(_row("nc2_orth", layer, rep, metric_value(metrics, layer, rep, "nc2_orth"),
                             0.0, tol.geometry_atol, "DNC2: orthogonal equal-norm means",
                             mode="abs"))
        else:
            rows.append(_row("nc2_orth", layer, rep, metric_value(metrics, layer, rep, "nc2_orth"),
                             math.nan, 0.0, "not pinned (flat family, docs/theory.md s3)"))
            rows.append(_row("mean_norm_spread", layer, rep,
                             metric_value(metrics, layer, rep, "mean_norm_spread"), 0.0,
                             tol.structure_rtol, "equal class-mean norms", mode="abs"))
            rows.append(_row("max_cos_uncentred", layer, rep,
                             metric_value(metrics, layer, rep, "max_cos_uncentred"), 0.0,
                             tol.structure_rtol, "class-mean cosines <= 0", mode="le"))
    # Class-mean norms: a (H_1), s_l (post-ReLU layer l), c* (output).
    norm_reps = [(l, r) for l, r in dufm_columns(L) if r != "pre"]
    for (layer, rep), pred in zip(norm_reps, opt.mean_norms):
        rows.append(_row("class-mean norm", layer, rep, metric_value(metrics, layer, rep, "mean_norm"),
                         pred, tol.structure_rtol, "a, s_l, c*"))
    # DNC3: rows of W_l in span of its input means (l >= 2); W_L proportional to M_L^T.
    for l in range(2, L + 1):
        rows.append(_row("nc3_span", l, "post", metric_value(metrics, l, "post", "nc3_span"), 0.0,
                         tol.geometry_atol, f"DNC3: row space of W_{l} in span(M_{l})",
                         mode="abs"))
    rows.append(_row("nc3_uncentred", L, "post", metric_value(metrics, L, "post", "nc3_uncentred"),
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
    l_tri = triangle_loss(K, L, n, settings["lambda_H1"], settings["lambda_W"])
    final = history.iloc[-1].to_dict()
    loss = float(final["loss"])
    converged = is_converged(history, tol) if converged is None else converged
    local = opt.local_loss if opt.zero_optimal and opt.local_loss is not None else None
    rows = _loss_rows(loss, opt, local, l_tri, tol)
    code = _verdict_code(K, L, loss, opt, local, converged, tol)
    ref = _reference(code, opt, always_structure)
    if ref is not None:
        rows += _structure_rows(ref, L, final, metrics, weights, tol)
    comparison = pd.DataFrame(rows)
    comparison.insert(0, "run", run)
    checked = comparison.loc[~comparison["quantity"].str.startswith("loss"), "pass"].dropna()
    gap = (loss - opt.loss) / opt.loss
    text = (VERDICTS[code] if code != "not_converged"
            else f"not converged (loss {gap:+.2e} relative to L_DNC)")
    verdict = verdict_row(run, code, text, converged=converged, steps=int(final["step"]), final_loss=loss,
                          final_grad_norm=float(final["grad_norm"]), rel_gap=gap,
                          theory=theory_columns(opt, l_tri),
                          ranks=rank_columns(K, L, loss, opt.loss, l_tri, metrics, tol),
                          structure_checks=int(len(checked)),
                          structure_failed=int((~checked.astype(bool)).sum()))
    return comparison, verdict


def _loss_rows(loss: float, opt: DNCOptimum, local: float | None, l_tri: float | None,
               tol: Tolerances) -> list[dict]:
    """The loss against L_DNC, against the DNC-shaped local minimum (local, where zero is optimal)
    and against L_tri where the triangle construction exists."""
    rows = [_row("loss vs L_DNC", 0, "", loss, opt.loss, tol.loss_rtol, "closed form")]
    if local is not None:
        rows.append(_row("loss vs DNC local minimum", 0, "", loss, local, tol.loss_rtol,
                         "g(c) at the largest stationary c"))
    if l_tri is not None:
        rows.append(_row("loss vs L_tri", 0, "", loss, l_tri, tol.loss_rtol,
                         "triangle construction (an upper bound on the optimum)"))
    return rows


def _verdict_code(K: int, L: int, loss: float, opt: DNCOptimum, local: float | None, converged: bool,
                  tol: Tolerances) -> str:
    """The loss-based verdict code (a key of VERDICTS other than "diverged")."""
    gap = (loss - opt.loss) / opt.loss
    # A loss below L_DNC is a certificate on its own (DNC is not optimal), converged or not.
    if gap < -tol.loss_rtol and not opt.zero_optimal:
        return "below_dnc_low_rank"
    if not converged:
        return "not_converged"
    if abs(gap) <= tol.loss_rtol:
        return "global_optimum" if (K == 2 or L <= 2 or opt.zero_optimal) else "dnc"
    if local is not None and abs(loss - local) / local <= tol.loss_rtol:
        return "dnc_local_minimum"
    return "above_dnc"


def _reference(code: str, opt: DNCOptimum, always_structure: bool) -> DNCOptimum | None:
    """The DNC structure the run's layers are checked against: the optimum where the run agrees
    with it (or always_structure asks for it), the local minimum where the run is there; None when
    there is nothing to check (zero is optimal, or the run is elsewhere)."""
    if code in ("global_optimum", "dnc") and not opt.zero_optimal:
        return opt
    if code == "dnc_local_minimum":
        return local_minimum_structure(opt)
    if always_structure and not opt.zero_optimal:
        return opt
    return None


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
    lam_H, lam_W = float(settings["lambda_H1"]), settings["lambda_W"]
    # A network head may have a zero penalty (no closed form): it can diverge all the same.
    theory = (theory_columns(None, None) if lam_H == 0 or min(lambda_vector(lam_W, L, allow_zero=True)) == 0
              else theory_columns(dnc_optimum(K, L, n, lam_H, lam_W), triangle_loss(K, L, n, lam_H, lam_W)))
    step = int(history["step"].iloc[-1])
    finite = history[np.isfinite(history["loss"]) & np.isfinite(history["grad_norm"])]
    last_loss = float(finite["loss"].iloc[-1]) if len(finite) else math.nan
    what = "loss" if not np.isfinite(history["loss"].iloc[-1]) else "gradient norm"
    text = (f"diverged: non-finite {what} at step {step} (last finite loss {last_loss:.6g}); "
            f"lr {settings.get('lr')}")
    verdict = verdict_row(run, DIVERGED, text, converged=False, steps=step, final_loss=last_loss,
                          final_grad_norm=float(history["grad_norm"].iloc[-1]), rel_gap=math.nan,
                          theory=theory, ranks=diverged_rank_columns(text))
    return empty_comparison(), verdict


def empty_comparison() -> pd.DataFrame:
    """A comparison table with no rows and the columns and dtypes of compare_run's."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COMPARISON_COLUMNS.items()})
