"""Closed forms of the deep unconstrained features model (DUFM).

Source: Súkeník, Mondelli, Lampert, "Deep Neural Collapse Is Provably Optimal for the Deep
Unconstrained Features Model" (NeurIPS 2023). Derivation sketch and conventions: docs/theory.md.

Model (L layers, K classes, n samples per class, N = K n)::

    (1/(2N)) ||W_L s(W_{L-1} ... s(W_1 H_1)) - Y||_F^2
        + sum_l (lambda_W_l / 2) ||W_l||_F^2 + (lambda_H1 / 2) ||H_1||_F^2

Every DNC-shaped solution has loss g(c) with c the output class-mean scale::

    g(c) = (1 - c)^2 / 2 + (K (L + 1) / 2) P^{1/(L+1)} c^{2/(L+1)},
    P = n lambda_H1 prod_l lambda_W_l.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DNCOptimum", "dnc_optimum", "dnc_loss", "largest_root", "local_minimum_structure",
           "lambda_vector", "REGIME_NONZERO", "REGIME_ZERO_LOCAL", "REGIME_ZERO", "REGIME_NO_THEORY"]

# The regimes of DNCOptimum.regime: below the threshold the non-zero DNC solution is optimal; above
# it zero is, with or without a DNC-shaped local minimum. REGIME_NO_THEORY: no closed form at all
# (a zero penalty, e.g. a network head trained without weight decay).
REGIME_NONZERO = "nonzero optimum"
REGIME_ZERO_LOCAL = "zero optimum (DNC local minimum exists)"
REGIME_ZERO = "zero optimum"
REGIME_NO_THEORY = "no theory"


def lambda_vector(lambda_W: float | Sequence[float], L: int, allow_zero: bool = False) -> list[float]:
    """Return the per-layer weight decays (length L) from a number or a length-L sequence.

    The closed forms need positive decays; allow_zero admits 0 where only the objective is
    evaluated (a network head trained without weight decay)."""
    if isinstance(lambda_W, int | float):
        lams = [float(lambda_W)] * L
    else:
        lams = [float(v) for v in lambda_W]
        if len(lams) != L:
            raise ValueError(f"lambda_W: {len(lams)} values for L = {L} layers; give one number or one "
                             f"per layer")
    if any(v < 0 or (v == 0 and not allow_zero) for v in lams):
        raise ValueError(f"lambda_W must be {'>= 0' if allow_zero else 'positive'}, got {lams}")
    return lams


def dnc_loss(c: float, K: int, L: int, P: float) -> float:
    """g(c): loss of the best DNC-shaped solution whose output class means are c I_K."""
    return (1.0 - c) ** 2 / 2.0 + K * (L + 1) / 2.0 * P ** (1.0 / (L + 1)) * c ** (2.0 / (L + 1))


def _stationarity(c: float, K: int, L: int, P: float) -> float:
    """c^{(L-1)/(L+1)} (1 - c) - K P^{1/(L+1)}: zero at the stationary points c > 0 of g."""
    return c ** ((L - 1) / (L + 1)) * (1.0 - c) - K * P ** (1.0 / (L + 1))


def largest_root(K: int, L: int, P: float) -> float | None:
    """Largest root of the stationarity equation on [(L-1)/(2L), 1], or None if there is none.

    The left side is unimodal on [0, 1] with its maximum at c = (L-1)/(2L) and decreases to
    -K P^{1/(L+1)} < 0 at c = 1, so a root exists iff the value at the maximum is >= 0.
    Bisection to machine precision (about 60 halvings).
    """
    lo, hi = (L - 1) / (2 * L), 1.0
    if _stationarity(lo, K, L, P) < 0:
        return None
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _stationarity(mid, K, L, P) >= 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 4 * math.ulp(hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class DNCOptimum:
    """The best DNC-shaped solution of an L-DUFM and its predicted structure.

    Attributes:
        K, L, n: classes, depth, samples per class.
        lambda_H: weight of (1/2)||H_1||^2 (summed over all N columns).
        lambda_W: per-layer weight decays, length L.
        P: n lambda_H prod_l lambda_W_l.
        threshold: the non-zero DNC solution is the global DNC optimum iff P < threshold,
            threshold = (L-1)^{L-1} / (K^{L+1} L^{2L}).
        zero_optimal: P >= threshold, so the all-zero solution (loss 1/2) wins.
        scale: c*, output class means c* I_K of the optimum (0.0 when zero is optimal).
        loss: L_DNC = min(1/2, g(c*)).
        local_scale, local_loss: the largest stationary c > 0 and g there, when it exists.
            Below the threshold these equal scale and loss; above it they describe the
            DNC-shaped local minimum that gradient descent can get stuck at (loss > 1/2).
        tau: P^{1/(L+1)} c*^{2/(L+1)}; every lambda ||.||^2 equals K tau.
        mean_norms: predicted class-mean norms [a, s_2, ..., s_L, c*]: a for H_1, s_l for the
            post-ReLU layer l, and c* for the output (length L + 1).
        weight_singular_values: for l = 2..L, the K equal non-zero singular values s_{l+1}/s_l
            of W_l (index 0 is W_2); empty when zero is optimal.
        penalty: predicted value of each lambda ||.||^2 term (K tau).
        fit: predicted fit term (1 - c*)^2 / 2.
    """

    K: int
    L: int
    n: int
    lambda_H: float
    lambda_W: tuple[float, ...]
    P: float
    threshold: float
    zero_optimal: bool
    scale: float
    loss: float
    local_scale: float | None
    local_loss: float | None
    tau: float
    penalty: float
    fit: float
    mean_norms: tuple[float, ...] = field(default_factory=tuple)
    weight_singular_values: tuple[float, ...] = field(default_factory=tuple)

    @property
    def regime(self) -> str:
        """REGIME_NONZERO, REGIME_ZERO_LOCAL or REGIME_ZERO."""
        if not self.zero_optimal:
            return REGIME_NONZERO
        if self.local_scale is not None:
            return REGIME_ZERO_LOCAL
        return REGIME_ZERO


def _structure(c: float, K: int, L: int, n: int, lam_H: float, lams: list[float], P: float):
    """tau, the class-mean norms [a, s_2..s_L, c] and the singular values of W_2..W_L at scale c."""
    tau = P ** (1.0 / (L + 1)) * c ** (2.0 / (L + 1))
    a = math.sqrt(tau / (n * lam_H))
    norms = [a]
    for lam in lams[:-1]:  # lambda_W_l s_{l+1}^2 / s_l^2 = tau for l = 1..L-1
        norms.append(norms[-1] * math.sqrt(tau / lam))
    norms.append(c)
    svs = tuple(norms[l + 1] / norms[l] for l in range(1, L))
    return tau, tuple(norms), svs


def dnc_optimum(
    K: int, L: int, n: int, lambda_H: float, lambda_W: float | Sequence[float]
) -> DNCOptimum:
    """Closed-form best DNC solution of the L-DUFM (docs/theory.md section 2).

    Args:
        K: number of classes (>= 2).
        L: number of weight layers (>= 1); ReLU after W_1..W_{L-1}.
        n: samples per class.
        lambda_H: regularisation of H_1 (the penalty sums over all N columns).
        lambda_W: one weight decay for every layer or a length-L sequence.

    Returns:
        DNCOptimum with ``loss`` (L_DNC), ``scale`` (c*), ``zero_optimal`` and ``threshold``.
        For K = 2 this is the unique global optimum; for K >= 3 and L >= 3 it is the reference
        that lower-rank solutions can beat.
    """
    if K < 2 or L < 1 or n < 1:
        raise ValueError(f"need K >= 2, L >= 1, n >= 1; got K={K}, L={L}, n={n}")
    if lambda_H <= 0:
        raise ValueError(f"lambda_H must be positive, got {lambda_H}")
    lams = lambda_vector(lambda_W, L)
    P = n * lambda_H * math.prod(lams)
    threshold = (L - 1) ** (L - 1) / (K ** (L + 1) * L ** (2 * L))
    root = largest_root(K, L, P)
    local_loss = dnc_loss(root, K, L, P) if root is not None else None
    zero_optimal = root is None or local_loss >= 0.5
    c = 0.0 if zero_optimal else root
    tau, norms, svs = _structure(c, K, L, n, lambda_H, lams, P) if c > 0 else (0.0, (), ())
    return DNCOptimum(
        K=K,
        L=L,
        n=n,
        lambda_H=float(lambda_H),
        lambda_W=tuple(lams),
        P=P,
        threshold=threshold,
        zero_optimal=zero_optimal,
        scale=c,
        loss=0.5 if zero_optimal else local_loss,
        local_scale=root,
        local_loss=local_loss,
        tau=tau,
        penalty=K * tau,
        fit=(1.0 - c) ** 2 / 2.0,
        mean_norms=norms,
        weight_singular_values=svs,
    )


def local_minimum_structure(opt: DNCOptimum) -> DNCOptimum:
    """The DNC-shaped local minimum above the threshold, as a DNCOptimum-like record.

    Raises ValueError when no such stationary point exists.
    """
    if opt.local_scale is None:
        raise ValueError("no DNC-shaped stationary point exists at these lambdas")
    c = opt.local_scale
    tau, norms, svs = _structure(c, opt.K, opt.L, opt.n, opt.lambda_H, list(opt.lambda_W), opt.P)
    return DNCOptimum(
        **{
            **opt.__dict__,
            "scale": c,
            "loss": opt.local_loss,
            "tau": tau,
            "penalty": opt.K * tau,
            "fit": (1.0 - c) ** 2 / 2.0,
            "mean_norms": norms,
            "weight_singular_values": svs,
        }
    )
