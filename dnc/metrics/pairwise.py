"""Statistics over class pairs without a K x K matrix: Gram tiles of a few rows at a time.

With K up to tens of thousands of classes (a vocabulary), a K x K float64 matrix takes gigabytes
(8.6 GB at K = 32,768). Every pairwise quantity here is reduced tile by tile: a tile is the rows
i0..i1 of a Gram matrix against the columns i0..K (the upper triangle only, by symmetry), of at
most PAIR_TILE_ELEMENTS entries, and each statistic is merged across tiles with the pairwise
update of Chan, Golub and LeVeque, which keeps the variance exact where a one-pass
E[x^2] - E[x]^2 would cancel. Definitions of the measures: docs/metrics.md section 5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Moments", "LogMoments", "PAIR_TILE_ELEMENTS", "row_tiles", "gram_fro", "PairSweep"]

ACC = torch.float64
# Entries of one float64 tile (8 MiB; 32 MiB tiles held +700 MiB at K = 5,837, benchmarks/README.md
# "Language models"); a sweep holds a handful of tiles at a time.
PAIR_TILE_ELEMENTS = 1 << 20


def row_tiles(rows: int, width: int, budget: int | None = None) -> Iterator[tuple[int, int]]:
    """Row ranges [i0, i1) such that (i1 - i0) x width stays within budget entries."""
    budget = budget or PAIR_TILE_ELEMENTS
    step = max(1, budget // max(1, width))
    for i0 in range(0, rows, step):
        yield i0, min(i0 + step, rows)


def gram_fro(A: torch.Tensor) -> float:
    """||A^T A||_F of A (d, K) from the smaller of the two Gram matrices (||A^T A|| = ||A A^T||):
    an exact float64 product either way, never a K x K matrix when K > d."""
    d, K = A.shape
    if K <= d:
        return float(sum(torch.linalg.matrix_norm(A[:, i0:i1].T @ A).square()
                         for i0, i1 in row_tiles(K, K)) ** 0.5)
    return float(torch.linalg.matrix_norm(A @ A.T))


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max of a stream of value tensors."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, v: torch.Tensor) -> None:
        """Merge the values v (any shape) into the running statistics."""
        nb = v.numel()
        if nb == 0:
            return
        mb = float(v.mean())
        m2b = float((v - mb).square().sum()) if math.isfinite(mb) else math.nan
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        n = self.n + nb
        if not (math.isfinite(mb) and math.isfinite(self.mean)):
            # inf values (coincident class means) make the mean inf and the spread undefined.
            self.mean = self.mean * (self.n / n) + mb * (nb / n)
            self.m2 = math.nan
        else:
            delta = mb - self.mean
            self.mean += delta * nb / n
            self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n

    @property
    def std(self) -> float:
        """Population standard deviation (0 for a single value)."""
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else math.nan


@dataclass
class LogMoments:
    """Mean and spread of exp(a) from a stream of log-values a, without overflow or underflow.

    Values are kept scaled by exp(-ref), ref the largest a seen so far, so that a Riesz kernel
    ||x - y||^-s with s in the thousands (2^-2047 at d = 4096) is summed exactly.
    """

    n: int = 0
    ref: float = -math.inf
    mean: float = 0.0  # of exp(a - ref)
    m2: float = 0.0

    def add(self, a: torch.Tensor) -> None:
        nb = a.numel()
        if nb == 0:
            return
        top = float(a.max())
        if top == math.inf:
            self.n, self.ref, self.mean, self.m2 = self.n + nb, math.inf, math.nan, math.nan
            return
        if self.ref == math.inf:
            self.n += nb
            return
        ref = max(self.ref, top)
        v = torch.exp(a - ref)
        mb = float(v.mean())
        m2b = float((v - mb).square().sum())
        if self.n:
            scale = math.exp(self.ref - ref)
            self.mean *= scale
            self.m2 *= scale * scale
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n, self.ref = n, ref

    @property
    def log_mean(self) -> float:
        """log of the mean of exp(a); inf when some a is inf."""
        return self.ref + math.log(self.mean) if self.ref < math.inf else math.inf

    @property
    def cv(self) -> float:
        """Coefficient of variation std/mean of exp(a) (population std)."""
        if self.ref == math.inf or not self.n:
            return math.nan
        return math.sqrt(max(self.m2, 0.0) / self.n) / self.mean


class PairSweep:
    """Every class-pair statistic of the means metrics in one tiled sweep over k < j.

    Args:
        M: (d, K) uncentred class means; Mc: (d, K) centred class means.
        var: optional (K,) within-class variances sigma_k^2 (CDNV); None skips the CDNV family.
        riesz_s: exponent s of the Riesz kernel ||x - y||^-s on the normalised centred means.
        cdnv_exponent: exponent e of the squared distance in cdnv_exp.

    Attributes after run(): orth_ss and etf_ss (sums of squares over the off-diagonal entries of
    the normalised Gram minus its target, both triangles), agop_ss (the same for the cosines of
    the centred means against the unit-diagonal simplex Gram's -1/(K - 1), the off-diagonal part
    of nc2_agop), max_cos (uncentred), and Moments or
    LogMoments of the centred cosines (interference), the normalised distances, the log kernel,
    the Riesz kernel and the two CDNVs.
    """

    def __init__(self, M: torch.Tensor, Mc: torch.Tensor, var: torch.Tensor | None,
                 riesz_s: float, cdnv_exponent: float) -> None:
        self.M, self.Mc, self.var = M, Mc, var
        self.s, self.e = riesz_s, cdnv_exponent
        self.K = M.shape[1]
        self.norms = M.norm(dim=0)  # (K,)
        self.norms_c = Mc.norm(dim=0)  # (K,)
        self.nG, self.nGc = gram_fro(M), gram_fro(Mc)
        self.orth_ss = self.etf_ss = self.agop_ss = 0.0
        self.agop_off = 1.0 / (self.K - 1) if self.K > 1 else 0.0  # minus E_kj, k != j
        self.max_cos = -math.inf
        self.cos = Moments()
        self.dist = Moments()
        self.log_kernel = Moments()
        self.riesz = LogMoments()
        self.cdnv = Moments()
        self.cdnv_exp = Moments()

    def run(self) -> PairSweep:
        K = self.K
        tiny = torch.finfo(ACC).tiny
        off_target = 1.0 / (K * math.sqrt(K - 1))  # minus the ETF target off the diagonal
        for i0, i1 in row_tiles(K, K):
            rows = slice(i0, i1)
            G = self.M[:, rows].T @ self.M[:, i0:]  # (t, K - i0)
            Gc = self.Mc[:, rows].T @ self.Mc[:, i0:]  # (t, K - i0)
            t = i1 - i0
            # The t x t block on the diagonal needs its strict upper triangle; the rest is all k < j.
            iu = torch.triu_indices(t, t, offset=1, device=G.device)
            for g, gc, cols in ((G[:, :t][iu[0], iu[1]], Gc[:, :t][iu[0], iu[1]], (iu[0] + i0, iu[1] + i0)),
                                (G[:, t:], Gc[:, t:], None)):
                if cols is None:
                    r, c = slice(i0, i1), slice(i1, K)
                    n_r, n_c = self.norms[r, None], self.norms[None, c]
                    nc_r, nc_c = self.norms_c[r, None], self.norms_c[None, c]
                    v_r = v_c = None
                    if self.var is not None:
                        v_r, v_c = self.var[r, None], self.var[None, c]
                else:
                    n_r, n_c = self.norms[cols[0]], self.norms[cols[1]]
                    nc_r, nc_c = self.norms_c[cols[0]], self.norms_c[cols[1]]
                    if self.var is not None:
                        v_r, v_c = self.var[cols[0]], self.var[cols[1]]
                self._block(g, gc, n_r, n_c, nc_r, nc_c,
                            None if self.var is None else (v_r, v_c), off_target, tiny)
        return self

    def _block(self, g, gc, n_r, n_c, nc_r, nc_c, var, off_target, tiny) -> None:
        if g.numel() == 0:
            return
        if self.nG > 0:
            self.orth_ss += 2 * float((g / self.nG).square().sum())
        if self.nGc > 0:
            self.etf_ss += 2 * float((gc / self.nGc + off_target).square().sum())
        self.max_cos = max(self.max_cos, float((g / (n_r * n_c).clamp_min(tiny)).max()))
        cos = gc / (nc_r * nc_c).clamp_min(tiny)
        self.cos.add(cos)
        # (u_k.u_j - E_kj)^2 pair by pair, both triangles: exact to the cosines' rounding at the ETF.
        self.agop_ss += 2 * float((cos + self.agop_off).square().sum())
        # ||x^ - y^||^2 = 2 - 2 cos for unit vectors; rounding can push it a hair below 0.
        dist = (2 - 2 * cos).clamp_min_(0).sqrt_()
        self.dist.add(dist)
        log_dist = dist.log()  # -inf for coincident directions: both kernels are +inf there
        self.log_kernel.add(-log_dist)
        self.riesz.add(-self.s * log_dist)
        if var is not None:
            # Distances of the centred means: translation invariant and free of the offset's
            # cancellation that the uncentred Gram would bring.
            d2 = (nc_r.square() + nc_c.square() - 2 * gc).clamp_min_(0)
            num = var[0] + var[1]
            inf = torch.tensor(math.inf, dtype=ACC, device=d2.device)
            zero = torch.zeros((), dtype=ACC, device=d2.device)
            fallback = torch.where(num > 0, inf, zero)
            self.cdnv.add(torch.where(d2 > 0, num / (2 * d2), fallback))
            self.cdnv_exp.add(torch.where(d2 > 0, num / (2 * d2.pow(self.e)), fallback))
