"""The verdict of a run against the closed forms: its codes, the tolerances that decide it, and the
one-row verdict table (docs/schemas.md).

verdict_row() owns the verdict columns and their order; every producer builds its row with it
(dnc.dufm.compare.compare_run and diverged_run, dnc.nets.compare for the network heads, which
append NETWORK_COLUMNS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from dnc.theory import DNCOptimum
from dnc.theory.dnc import REGIME_NO_THEORY

__all__ = ["Tolerances", "VERDICTS", "RANK_VERDICTS", "DIVERGED", "VERDICT_COLUMNS", "THEORY_COLUMNS",
           "RANK_COLUMNS", "NETWORK_COLUMNS", "theory_columns", "network_columns", "verdict_row"]

DIVERGED = "diverged"  # the verdict and the rank verdict of a run whose loss became NaN or inf

VERDICTS = {
    "global_optimum": "agrees with the global optimum",
    "dnc": "at the DNC solution (L_DNC); not proven optimal for K >= 3, L >= 3",
    "dnc_local_minimum": "at a DNC-shaped local minimum (zero is optimal)",
    "below_dnc_low_rank": "below DNC (low-rank solution)",
    "above_dnc": "above L_DNC at another stationary point",
    "not_converged": "not converged",
    DIVERGED: "diverged (non-finite loss)",
}

RANK_VERDICTS = ("dnc", "low-rank", "other", DIVERGED)

# The closed forms' columns (theory_columns) and the rank analysis's (dnc.dufm.rank.rank_columns).
THEORY_COLUMNS = ("L_DNC", "c_star", "P", "threshold", "regime", "local_min_loss", "L_tri")
RANK_COLUMNS = ("loss_over_L_DNC", "loss_over_L_tri", "min_hidden_rank", "min_hidden_rank_pre",
                "min_hidden_rank_post", "rank_verdict", "rank_verdict_text", "deciding_rank",
                "deciding_layer", "deciding_representation")
VERDICT_COLUMNS = ("run", "verdict", "verdict_text", "converged", "steps", "final_loss", "final_grad_norm",
                   "L_DNC", "rel_gap", "c_star", "P", "threshold", "regime", "local_min_loss", "L_tri",
                   *RANK_COLUMNS, "structure_checks", "structure_failed")
# Appended to the verdict of a network head (dnc.nets.compare.compare_network).
NETWORK_COLUMNS = ("recovered_dufm_optimum", "dnc_geometry", "geometry_failed", "epoch", "n")


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


def theory_columns(opt: DNCOptimum | None, l_tri: float | None) -> dict[str, float | str]:
    """THEORY_COLUMNS of the closed forms: L_DNC, c*, P, the threshold and regime, the loss of the
    DNC-shaped local minimum where zero is optimal, L_tri (NaN where undefined). opt None: no closed
    form (a zero penalty), every number NaN and regime REGIME_NO_THEORY."""
    if opt is None:
        return {**dict.fromkeys(THEORY_COLUMNS, math.nan), "regime": REGIME_NO_THEORY}
    return {"L_DNC": opt.loss, "c_star": opt.scale, "P": opt.P, "threshold": opt.threshold,
            "regime": opt.regime, "local_min_loss": opt.local_loss if opt.zero_optimal else math.nan,
            "L_tri": l_tri if l_tri is not None else math.nan}


def network_columns(recovered: bool, dnc_geometry: bool, geometry_failed: int, epoch: int,
                    n: float) -> dict[str, bool | int | float]:
    """NETWORK_COLUMNS, in order: recovered_dufm_optimum, dnc_geometry, geometry_failed, epoch, n."""
    return dict(zip(NETWORK_COLUMNS, (recovered, dnc_geometry, geometry_failed, epoch, n), strict=True))


def _exactly(what: str, values: Mapping, columns: tuple[str, ...]) -> None:
    if set(values) != set(columns):
        raise ValueError(f"{what}: got columns {sorted(values)}, need {list(columns)}")


def verdict_row(run: str, code: str, text: str, *, converged: bool, steps: int, final_loss: float,
                final_grad_norm: float, rel_gap: float, theory: Mapping, ranks: Mapping,
                structure_checks: int = 0, structure_failed: int = 0,
                network: Mapping | None = None) -> pd.DataFrame:
    """The one-row verdict table, columns VERDICT_COLUMNS (then NETWORK_COLUMNS when network is
    given) in that order.

    Args:
        code, text: the verdict code (a key of VERDICTS, or "no_theory" for a network head without
            a penalty) and its text.
        theory: theory_columns(...); ranks: dnc.dufm.rank.rank_columns(...) (RANK_COLUMNS);
        network: network_columns(...).

    Raises:
        ValueError: theory, ranks or network do not have exactly their columns.
    """
    _exactly("theory", theory, THEORY_COLUMNS)
    _exactly("ranks", ranks, RANK_COLUMNS)
    values = {"run": run, "verdict": code, "verdict_text": text, "converged": converged, "steps": steps,
              "final_loss": final_loss, "final_grad_norm": final_grad_norm, "rel_gap": rel_gap, **theory,
              **ranks, "structure_checks": structure_checks, "structure_failed": structure_failed}
    columns = VERDICT_COLUMNS
    if network is not None:
        _exactly("network", network, NETWORK_COLUMNS)
        values.update(network)
        columns += NETWORK_COLUMNS
    return pd.DataFrame([{c: values[c] for c in columns}])
