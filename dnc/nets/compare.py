"""A trained network's head against the DUFM theory at its last measured epoch.

The head is a DUFM whose H_1 is the backbone output on the training split: K classes, N training
samples, n = N / K (a float when the split is not balanced), depth L = head_layers + 1, the
network's lambda_H1 and lambda_W. Its objective (dnc.nets.extract.head_objective) is compared with
L_DNC and its per-layer structure with the DNC prediction, within network tolerances that are
looser than the DUFM ones (a network trained by SGD only approaches a stationary point).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from dnc.dufm.compare import Tolerances, compare_run

__all__ = ["NETWORK_TOLERANCES", "head_settings", "compare_network"]

# Defaults of theory.network_tolerances: "recovered" means within 10 % in loss and structure.
NETWORK_TOLERANCES = {"loss_rtol": 0.1, "structure_rtol": 0.1, "collapse_atol": 1e-2, "geometry_atol": 0.1}


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
        recovered_dufm_optimum (objective AND every structure check within tolerance), epoch, and
        a text that states the measured gap.
    """
    tol = Tolerances(**{**NETWORK_TOLERANCES, **(tolerances or {})})
    history = objective.rename(columns={"epoch": "step"}).sort_values("step")
    last = int(history["step"].iloc[-1])
    at_last = metrics[(metrics["step"] == last) & (metrics["split"] == "train")]
    comparison, verdict = compare_run(run, settings, history.assign(grad_norm=float("nan")), at_last,
                                      weights, tol, converged=True, always_structure=True)
    v = verdict.iloc[0]
    recovered = bool(v["verdict"] in ("global_optimum", "dnc")) and int(v["structure_failed"]) == 0
    verdict["recovered_dufm_optimum"] = recovered
    # A trained network is not a stationary point of the DUFM: say what was measured.
    verdict["verdict_text"] = (
        f"{'recovered' if recovered else 'did not recover'} DUFM-optimal features: objective "
        f"{v['rel_gap']:+.1%} vs L_DNC, {v['structure_failed']} of {v['structure_checks']} layer "
        f"checks fail")
    verdict["epoch"] = last
    verdict["n"] = float(settings["n"])
    return comparison, verdict
