"""The triangle (strongly-regular-graph) low-rank competitor of DNC for K = C(r, 2) classes.

Source: Súkeník, Lampert, Mondelli, "Neural collapse versus low-rank bias: Is deep neural collapse
really optimal?" (NeurIPS 2024). Derivation and construction: docs/theory.md section 4.

Conventions: classes are the edges {i, j} of the complete graph on r vertices in lexicographic
order (``itertools.combinations(range(r), 2)``), triangles likewise (``combinations(range(r), 3)``);
B (r x K) is the vertex-edge and T (C(r,3) x K) the triangle-edge incidence matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from dnc.theory.dnc import dnc_loss, lambda_vector, largest_root

__all__ = ["TriangleOptimum", "triangle_loss", "triangle_optimum", "incidence_matrices", "FOLLOWUP_REFERENCE"]


@dataclass(frozen=True)
class LowRankSetting:
    """A DUFM setting of the low-rank comparison: K classes, L layers, n per class, every lambda."""

    K: int
    L: int
    n: int
    lam: float


# The reference setting of the follow-up paper (docs/theory.md section 5.3): the 4-DUFM with
# K = C(5, 2) = 10, n = 5 and lambda_H1 = every lambda_W = 0.004.
FOLLOWUP_REFERENCE = LowRankSetting(K=10, L=4, n=5, lam=0.004)


def _classes_of(K: int) -> int | None:
    """r with K = C(r, 2), or None when K is not of that form."""
    r = (1 + math.isqrt(1 + 8 * K)) // 2
    return r if r * (r - 1) // 2 == K else None


def _Q(r: int, L: int, n: int, lambda_H: float, lams: list[float]) -> float:
    """Q of docs/theory.md section 4.2: the product of the L+1 halved penalties divided by c^2."""
    K = r * (r - 1) // 2
    nu_B = math.sqrt(2 * (r - 1)) + (r - 1) * math.sqrt(r - 2)  # ||B||_*
    S_mu = 1 / (3 * (r - 2)) + (r - 1) / (2 * r - 6) + (K - r) / (r - 4)  # tr((T^T T)^{-1})
    Q = n * lambda_H * lams[0] * nu_B**2 / 4  # H_1 and W_1
    for lam in lams[1 : L - 2]:  # W_l, l = 2 .. L-2 (none for L = 3)
        Q *= r * lam / 2
    Q *= math.comb(r, 3) * r * lams[L - 2] / 2  # W_{L-1}
    return Q * lams[L - 1] * S_mu / 8  # W_L


def _best(L: int, Q: float) -> tuple[float, float]:
    """(c, loss): the largest root of the stationarity equation of g with K = 2, P = Q, and g there;
    (0.0, 0.5) when the root does not exist or g(root) >= 1/2 (the zero solution wins)."""
    root = largest_root(2, L, Q)
    if root is None:
        return 0.0, 0.5
    loss = dnc_loss(root, 2, L, Q)
    return (0.0, 0.5) if loss >= 0.5 else (root, loss)


def triangle_loss(
    K: int, L: int, n: int, lambda_H: float, lambda_W: float | Sequence[float]
) -> float | None:
    """Loss of the triangle (strongly-regular-graph) low-rank construction, docs/theory.md section 4.

    Defined for K = C(r, 2) with r >= 5 and L >= 3; returns None otherwise. This is an upper bound
    on the optimum, not the optimum. ``lambda_W`` is one number or one value per layer.
    """
    r = _classes_of(K)
    if r is None or r < 5 or L < 3:
        return None
    # Same shape as g with K = 2 and P = Q: reuse the DNC machinery.
    return _best(L, _Q(r, L, n, lambda_H, lambda_vector(lambda_W, L)))[1]


def incidence_matrices(r: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T): vertex-edge (r x K) and triangle-edge (C(r,3) x K) incidence matrices, float64."""
    edges = list(combinations(range(r), 2))
    B = np.zeros((r, len(edges)))
    T = np.zeros((math.comb(r, 3), len(edges)))
    for k, (i, j) in enumerate(edges):
        B[[i, j], k] = 1.0
    for t, tri in enumerate(combinations(range(r), 3)):
        for k, (i, j) in enumerate(edges):
            T[t, k] = float(i in tri and j in tri)
    return B, T


@dataclass(frozen=True, eq=False)
class TriangleOptimum:
    """The triangle construction at its best output scale, with explicit parameters.

    Attributes:
        r, K, L, n, width: vertices, classes K = C(r, 2), weight layers, samples per class and the
            hidden width d of the construction (default C(r, 3) = max(r, C(r, 3)) for r >= 5).
        lambda_H, lambda_W: the regularisation (lambda_W per layer, length L).
        Q: the constant of docs/theory.md section 4.2 (L_tri is g with K = 2 and P = Q).
        zero_optimal: the all-zero solution (loss 1/2) is at least as good; then scale = 0 and every
            parameter array is zero.
        scale: c, output class means c I_K (0.0 when zero is optimal).
        loss: L_tri = min(1/2, min_c (1 - c)^2/2 + (L+1) Q^{1/(L+1)} c^{2/(L+1)}); equals
            ``triangle_loss``.
        fit: (1 - c)^2 / 2.
        term: the common value theta = (Q c^2)^{1/(L+1)} of each of the L+1 halved penalties
            (lambda/2)||.||_F^2 (0 when zero is optimal); loss = fit + (L+1) term.
        scales: (s_2, ..., s_{L-1}, a): middle-layer class means s_l B and last hidden 2a T.
        input_rank: rank of the H_1 class means (r; 0 when zero is optimal).
        pre_mean_ranks: class-mean ranks of the pre-activations of layers 2..L (length L-1): r,
            except at layer L, whose rank is rank(S) = r - 1 if r = 6 else r (S: the +-1 triangle
            sign matrix; for r = 6 every row sums to 0).
        mean_ranks: class-mean ranks of the post-activations of layers 2..L (length L-1): r at
            layers 2..L-1 and K at layer L.
        H1: (width, N) float64, N = K n, columns class by class (sample j in class j // n).
        W: [W_1, ..., W_L] float64; W_1..W_{L-1} are (width, width), W_L is (K, width).
            The arrays are read-only; copy them (e.g. ``torch.tensor(a)``) before training.
    """

    r: int
    K: int
    L: int
    n: int
    width: int
    lambda_H: float
    lambda_W: tuple[float, ...]
    Q: float
    zero_optimal: bool
    scale: float
    loss: float
    fit: float
    term: float
    scales: tuple[float, ...]
    input_rank: int
    pre_mean_ranks: tuple[int, ...]
    mean_ranks: tuple[int, ...]
    H1: np.ndarray
    W: tuple[np.ndarray, ...]

    @property
    def min_hidden_rank(self) -> int:
        """Smallest post-activation class-mean rank over layers 2..L (r, or 0 at the zero solution)."""
        return min(self.mean_ranks)


def _embed(A: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A zero-padded into the top-left corner of a (rows, cols) float64 array."""
    out = np.zeros((rows, cols))
    out[: A.shape[0], : A.shape[1]] = A
    return out


def _sym_power(r: int, p: float) -> np.ndarray:
    """(B B^T)^p for the vertex-edge incidence B: B B^T = (r-2) I + J, eigenvalues 2(r-1) (on 1)
    and r-2 (on its complement)."""
    P1 = np.full((r, r), 1.0 / r)
    return (r - 2) ** p * (np.eye(r) - P1) + (2 * (r - 1)) ** p * P1


def triangle_optimum(
    r: int, L: int, n: int, lambda_H: float, lambda_W: float | Sequence[float], width: int | None = None
) -> TriangleOptimum:
    """Best triangle construction for K = C(r, 2) classes and explicit parameters attaining it.

    docs/theory.md section 4. With the scales chosen so that the L+1 halved penalties all equal
    theta = (Q c^2)^{1/(L+1)} (AM-GM), the layers are (hidden vectors zero-padded to ``width``):

    - (H_1, W_1): the balanced factorisation of X = s_2 B (x) 1_n^T, W_1 = k (B B^T)^{1/4} and
      H_1 = (s_2/k) (B B^T)^{-1/4} B (x) 1_n^T with k = (n lambda_H / lambda_W1)^{1/4} sqrt(s_2), so
      each of the two terms is (1/2) sqrt(n lambda_H lambda_W1) s_2 ||B||_*; no ReLU is active;
    - W_l = (s_{l+1}/s_l) I_r for l = 2..L-2 (none for L = 3);
    - W_{L-1}: row t = (a/s_{L-1}) (1_t - 1_{t^c}), giving 2a T after the ReLU;
    - W_L = c (2a T)^+, so the output is c I_K on every sample.

    Args:
        r: vertices (>= 5); K = C(r, 2) classes.
        L: weight layers (>= 3).
        n: samples per class (>= 1).
        lambda_H: weight of (1/2)||H_1||_F^2 (a sum over all N columns), > 0.
        lambda_W: one weight decay or one per layer (length L), all > 0.
        width: hidden width d >= C(r, 3); default C(r, 3).

    Returns:
        TriangleOptimum; when zero is optimal (no root, or g(root) >= 1/2) the loss is 1/2 and the
        parameters are all zero. Raises ValueError naming the bad argument.
    """
    if r < 5:
        raise ValueError(f"r must be >= 5 (K = C(r, 2) classes), got r={r}")
    if L < 3:
        raise ValueError(f"L must be >= 3 for the triangle construction, got L={L}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if lambda_H <= 0:
        raise ValueError(f"lambda_H must be positive, got {lambda_H}")
    n_tri, K = math.comb(r, 3), math.comb(r, 2)
    d = n_tri if width is None else int(width)
    if d < max(r, n_tri):
        raise ValueError(f"width must be >= max(r, C(r, 3)) = {max(r, n_tri)}, got width={width}")
    lams = lambda_vector(lambda_W, L)
    Q = _Q(r, L, n, lambda_H, lams)
    c, loss = _best(L, Q)
    zero = c == 0.0
    N = K * n
    if zero:
        W = [np.zeros((d, d)) for _ in range(L - 1)] + [np.zeros((K, d))]
        H1, theta, scales = np.zeros((d, N)), 0.0, ()
        ranks_in, pre, post = 0, (0,) * (L - 1), (0,) * (L - 1)
    else:
        theta = (Q * c * c) ** (1.0 / (L + 1))
        B, T = incidence_matrices(r)
        nu_B = math.sqrt(2 * (r - 1)) + (r - 1) * math.sqrt(r - 2)
        s = [2 * theta / (nu_B * math.sqrt(n * lambda_H * lams[0]))]  # s_2
        for lam in lams[1 : L - 2]:  # s_{l+1} = s_l sqrt(2 theta / (r lambda_l)), l = 2..L-2
            s.append(s[-1] * math.sqrt(2 * theta / (r * lam)))
        a = s[-1] * math.sqrt(2 * theta / (n_tri * r * lams[L - 2]))
        k = (n * lambda_H / lams[0]) ** 0.25 * math.sqrt(s[0])
        H1_means = (s[0] / k) * _sym_power(r, -0.25) @ B  # (r, K)
        H1 = _embed(np.repeat(H1_means, n, axis=1), d, N)
        W = [_embed(k * _sym_power(r, 0.25), d, d)]
        W += [_embed((s[i + 1] / s[i]) * np.eye(r), d, d) for i in range(L - 3)]
        signs = 2.0 * np.array([[float(v in tri) for v in range(r)] for tri in combinations(range(r), 3)])
        W.append(_embed((a / s[-1]) * (signs - 1.0), d, d))  # (1_t - 1_{t^c}) = 2 1_t - 1
        W.append(_embed((c / (2 * a)) * np.linalg.pinv(T), K, d))
        scales = (*s, a)
        ranks_in = r
        pre = (r,) * (L - 2) + (r - 1 if r == 6 else r,)
        post = (r,) * (L - 2) + (K,)
    for arr in (H1, *W):
        arr.flags.writeable = False
    return TriangleOptimum(
        r=r, K=K, L=L, n=n, width=d, lambda_H=float(lambda_H), lambda_W=tuple(lams), Q=Q,
        zero_optimal=zero, scale=c, loss=loss, fit=(1.0 - c) ** 2 / 2.0, term=theta, scales=scales,
        input_rank=ranks_in, pre_mean_ranks=pre, mean_ranks=post, H1=H1, W=tuple(W),
    )
