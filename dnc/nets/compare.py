"""A trained network's head against the DUFM theory at its last measured epoch.

The head is a DUFM whose H_1 is the backbone output on the training split: K classes, N training
samples, n = N / K (a float when the split is not balanced), depth L = head_layers + 1, the
network's lambda_H1 and lambda_W. Its objective (dnc.nets.extract.head_objective) is compared with
L_DNC and its per-layer structure with the DNC prediction, within network tolerances that are
looser than the DUFM ones (a network trained by SGD only approaches a stationary point): "recovered"
means the objective within 1 % of L_DNC (the target of the trained-head claim, Súkeník et al. 2023)
and every per-layer check within the structure tolerances. The verdict also says whether the DNC
geometry (DNC1, orthogonal equal-norm means, weights aligned with the means) holds at every head
layer, and, where the triangle construction exists (K = C(r, 2), r >= 5, L >= 3), how the objective
compares with L_tri and the smallest class-mean rank.

Without a penalty (lambda_H1 = 0 or some lambda_W_l = 0, e.g. the AGOP paper's recipe) the DUFM has
no closed-form optimum (the infimum is 0 and is not attained): the comparison is then empty and the
verdict is "no_theory".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from dnc.dufm.compare import COMPARISON_COLUMNS as DUFM_COMPARISON_COLUMNS
from dnc.dufm.compare import compare_run, diverged_run, empty_comparison
from dnc.dufm.rank import rank_columns
from dnc.dufm.verdict import Tolerances, network_columns, theory_columns, verdict_row
from dnc.theory import lambda_vector

__all__ = ["NETWORK_TOLERANCES", "COMPARISON_COLUMNS", "GEOMETRY_QUANTITIES", "head_settings",
           "diverged_network",
           "compare_network"]

# Defaults of theory.network_tolerances: "recovered" means the objective within 1 % of L_DNC and
# norms, penalties and spectra within 10 %. NC1 <= 0.01 and NC2/NC3 <= 0.1 are consistent with a
# 1 % loss gap (near a minimum the loss gap scales like the square of the geometric distances).
NETWORK_TOLERANCES = {"loss_rtol": 0.01, "structure_rtol": 0.1, "collapse_atol": 1e-2, "geometry_atol": 0.1}
# Comparison rows that make up "DNC geometry at every head layer" (the rest are scales: norms,
# penalties, singular values, the fit term).
GEOMETRY_QUANTITIES = ("nc1_pinv", "nc2_orth", "mean_norm_spread", "max_cos_uncentred", "nc3_span",
                       "nc3_uncentred")
# Columns of dnc.dufm.compare.compare_run's comparison table (docs/schemas.md).
COMPARISON_COLUMNS = list(DUFM_COMPARISON_COLUMNS)


def head_settings(num_classes: int, num_train: int, head_layers: int, lambda_H1: float,
                  lambda_W) -> dict:
    """The DUFM settings (K, L, n, lambda_H1, lambda_W) that a network head is compared with."""
    return {"K": int(num_classes), "L": int(head_layers) + 1, "n": num_train / num_classes,
            "lambda_H1": float(lambda_H1), "lambda_W": lambda_W}


def compare_network(run: str, settings: Mapping, objective: pd.DataFrame, metrics: pd.DataFrame,
                    weights: Mapping[int, np.ndarray],
                    tolerances: Mapping[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Theory vs the head at the last epoch of objective.

    Args:
        settings: head_settings(...).
        objective: one row per epoch with epoch, loss, fit, reg_H1, reg_W1..reg_WL.
        metrics: the run's tidy metrics (all epochs and splits; the train split of the last epoch
            is used).
        weights: layer -> W_l of the head at that epoch.
        tolerances: overrides of NETWORK_TOLERANCES.

    Returns:
        (comparison, verdict) as dnc.dufm.compare.compare_run, the verdict with
        recovered_dufm_optimum (objective AND every structure check within tolerance),
        dnc_geometry (every GEOMETRY_QUANTITIES check passes, at every head layer),
        geometry_failed (how many do not), epoch, and a text that states the measured gap to
        L_DNC, the geometry, and, where L_tri exists, loss / L_tri and the smallest class-mean
        rank. With lambda_H1 = 0 or any lambda_W_l = 0: an empty comparison (same columns) and a
        "no_theory" verdict (_no_theory).
    """
    tol = Tolerances(**{**NETWORK_TOLERANCES, **(tolerances or {})})
    history = objective.rename(columns={"epoch": "step"}).sort_values("step")
    last = int(history["step"].iloc[-1])
    at_last = metrics[(metrics["step"] == last) & (metrics["split"] == "train")]
    if _no_penalty(settings):
        return _no_theory(run, settings, history, at_last)
    comparison, verdict = compare_run(run, settings, history.assign(grad_norm=float("nan")), at_last,
                                      weights, tol, converged=True, always_structure=True)
    v = verdict.iloc[0]
    recovered = bool(v["verdict"] in ("global_optimum", "dnc")) and int(v["structure_failed"]) == 0
    geometry = comparison[comparison["quantity"].isin(GEOMETRY_QUANTITIES) & comparison["pass"].notna()]
    failed = geometry[~geometry["pass"].astype(bool)]
    # A trained network is not a stationary point of the DUFM: say what was measured.
    verdict["verdict_text"] = (
        f"{'recovered' if recovered else 'did not recover'} DUFM-optimal features: objective "
        f"{v['rel_gap']:+.1%} vs L_DNC, {_geometry_text(geometry, failed)}, "
        f"{v['structure_failed']} of {v['structure_checks']} layer checks fail"
        + _triangle_text(v, int(settings["K"])))
    verdict = verdict.assign(**network_columns(recovered, bool(len(geometry)) and failed.empty,
                                               int(len(failed)), last, float(settings["n"])))
    return comparison, verdict


def _geometry_text(geometry: pd.DataFrame, failed: pd.DataFrame) -> str:
    if geometry.empty:
        return "DNC geometry not checked"
    if failed.empty:
        return "DNC geometry at every head layer"
    checks = list(failed[["quantity", "layer", "representation"]].itertuples(index=False))
    if len(checks) <= 3:
        where = ", ".join(f"{q} at layer {int(l)}{' ' + r if r else ''}" for q, l, r in checks)
        return f"DNC geometry fails: {where}"
    # Many failures: which layers and which properties, not every row (the table has them).
    layers = ", ".join(str(int(l)) for l in sorted({c[1] for c in checks}))
    quantities = ", ".join(dict.fromkeys(c[0] for c in checks))
    return f"DNC geometry fails: {len(checks)} checks at layers {layers} ({quantities})"


def _triangle_text(v: pd.Series, K: int) -> str:
    """Where the low-rank competitor exists (L_tri finite): the objective against it and the
    smallest class-mean rank, which tells a DNC head (rank K everywhere) from a low-rank one."""
    if not np.isfinite(v["L_tri"]):
        return ""
    where = (f" at layer {int(v['deciding_layer'])} ({v['deciding_representation']})"
             if np.isfinite(v["deciding_rank"]) else "")
    return (f"; objective {v['loss_over_L_tri']:.4f} L_tri (L_tri = {v['L_tri'] / v['L_DNC']:.4f} "
            f"L_DNC), smallest class-mean rank {v['deciding_rank']:.0f} of K = {K}{where}")


def _no_penalty(settings: Mapping) -> bool:
    lams = lambda_vector(settings["lambda_W"], int(settings["L"]), allow_zero=True)
    return float(settings["lambda_H1"]) == 0 or min(lams) == 0


def _no_theory(run: str, settings: Mapping, history: pd.DataFrame,
               at_last: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Empty comparison and the one-row "no_theory" verdict, with the columns of the normal verdict:
    measured values where they exist (final_loss, steps, min_hidden_rank), NaN for the theory's."""
    final = history.iloc[-1]
    K, L, loss, epoch = int(settings["K"]), int(settings["L"]), float(final["loss"]), int(final["step"])
    text = (f"no DUFM theory to compare with: lambda_H1 = {float(settings['lambda_H1']):g}, "
            f"lambda_W = {settings['lambda_W']} (a zero penalty has no closed-form optimum)")
    verdict = verdict_row(run, "no_theory", text, converged=True, steps=epoch, final_loss=loss,
                          final_grad_norm=math.nan, rel_gap=math.nan, theory=theory_columns(None, None),
                          ranks=rank_columns(K, L, loss, math.nan, None, at_last),
                          network=network_columns(False, False, 0, epoch, float(settings["n"])))
    return empty_comparison(), verdict


def diverged_network(run: str, settings: Mapping, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Empty comparison and the "diverged" verdict of a network whose training loss became NaN or
    inf (dnc.nets.train.diverged_epoch): dnc.dufm.compare.diverged_run on the training history,
    with the network verdict's own columns; steps and epoch are the epoch where it diverged.

    settings: head_settings(...), plus "lr" to name it in the verdict text.
    """
    steps = pd.DataFrame({"step": history["epoch"], "loss": history["train_loss"],
                          "grad_norm": history["train_loss"]})
    comparison, verdict = diverged_run(run, settings, steps)
    verdict["verdict_text"] = verdict["verdict_text"].str.replace(" at step ", " at epoch ", regex=False)
    verdict = verdict.assign(**network_columns(False, False, 0, int(history["epoch"].iloc[-1]),
                                               float(settings["n"])))
    return comparison, verdict
