"""Collapse measures as pure formulas of reduced quantities: class means and within-class sums (the
measures of a layer's weight against its class means are in duality.py). Nothing here touches files
or streams; dnc.metrics.accumulators produces the inputs.

Definitions, conventions and sources of every measure: docs/metrics.md. Notation: M = [mu_1 .. mu_K]
(d x K) class means, mu_G the global mean, M~ = M - mu_G 1^T the centred means.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from dnc.metrics.pairwise import PairSweep

__all__ = ["Convention", "ClassMeans", "MeansGeometry", "pinv_trace", "cdnv", "means_metrics", "spectra",
           "trace_metrics", "unit_roundoff"]

ACC = torch.float64


def unit_roundoff(dtype: torch.dtype | np.dtype | type) -> float:
    """u of the floating dtype (torch or NumPy) features were stored in: half the machine epsilon
    (2^-24 for float32, 2^-53 for float64), never below float64's, in which everything is
    accumulated."""
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).eps)
    return max(eps, torch.finfo(ACC).eps) / 2


@dataclass(frozen=True)
class Convention:
    """Choices that change metric values; recorded next to every value in the output tables.

    Attributes:
        global_mean: "classes" (mean of class means; Papyan et al.) or "samples" (sample mean).
        rank_rtol: singular values of the centred means below rank_rtol * s_max are treated as
            zero when forming Sigma_B^+ (the reported rank_sigma_B says how many were kept).
        rank_roundoff: c of the precision floor of the same cutoff: a direction v of the centred
            means is also dropped when its singular value is below c u sum_j |v_j| q_j, u the unit
            roundoff of the features' dtype and q_j the RMS of feature j (docs/metrics.md section
            3, "The cutoffs"): float32 features cannot resolve directions below their rounding.
            0 restores the purely relative cutoff.
        means_rank_rtol: threshold of the numerical rank of M (docs/metrics.md; 1e-3 as in
            Súkeník et al. 2024).
        spectra: also accumulate the d x d within-class scatter for the Sigma_W spectrum and the
            effective rank (O(N d^2) time, O(d^2) memory, two O(d^3) eigendecompositions; 23x the
            default set's time at N = 50,000, d = 2048 on 2 CPU cores: off by default).
        cdnv_exponent: e in cdnv_exp, the CDNV with the squared distance raised to e (e = 1 is
            cdnv; rhubarbwu/neural-collapse's dist_exp).
        riesz_s: s of the Riesz kernel of the hyperspherical-uniformity measures; None: d - 2
            (at least 1), the harmonic choice of Liu et al. 2023 and rhubarbwu/neural-collapse.
        ncc_max_classes: above this many classes pass 2 skips the nearest-class-centre and
            classifier decisions (ncc_error, nc4, nc4_classifier, classifier_error), whose cost
            O(N K min(K, d)) dominates at vocabulary-sized K; None computes them always.
    """

    global_mean: str = "classes"
    rank_rtol: float = 1e-10
    rank_roundoff: float = 64.0
    means_rank_rtol: float = 1e-3
    spectra: bool = False
    cdnv_exponent: float = 2.0
    riesz_s: float | None = None
    ncc_max_classes: int | None = 4096

    def __post_init__(self) -> None:
        if self.global_mean not in ("classes", "samples"):
            raise ValueError(f"global_mean must be 'classes' or 'samples', got {self.global_mean!r}")
        if self.rank_rtol < 0 or self.rank_roundoff < 0:
            raise ValueError(f"rank_rtol and rank_roundoff must be >= 0, got {self.rank_rtol}, "
                             f"{self.rank_roundoff}")
        if self.ncc_max_classes is not None and self.ncc_max_classes < 0:
            raise ValueError(f"ncc_max_classes must be >= 0 or None, got {self.ncc_max_classes}")

    def riesz_exponent(self, d: int) -> float:
        """s of the Riesz kernel ||x - y||^-s: riesz_s, else d - 2 (at least 1) as in Liu et al."""
        return float(self.riesz_s) if self.riesz_s is not None else float(max(d - 2, 1))

    def ncc_enabled(self, K: int) -> bool:
        """Whether pass 2 runs the O(N K min(K, d)) nearest-centre and classifier decisions."""
        return self.ncc_max_classes is None or K <= self.ncc_max_classes

    def describe(self) -> str:
        """Short text stored in the 'convention' column of metric tables."""
        riesz = "d-2" if self.riesz_s is None else f"{self.riesz_s:g}"
        return (
            f"muG={self.global_mean};SigmaW=1/N;nc1_pinv=/K;cdnv=sq;nc3=papyan-unsquared;"
            f"rank_rtol={self.rank_rtol:g};rank_roundoff={self.rank_roundoff:g}u;"
            f"means_rank_rtol={self.means_rank_rtol:g};"
            f"cdnv_exp={self.cdnv_exponent:g};riesz_s={riesz}"
        )


@dataclass
class ClassMeans:
    """Reduced pass-1 state. M is (d, K) over the K classes present; classes maps to label ids;
    unit_roundoff is u of the coarsest dtype the features came in (unit_roundoff())."""

    classes: torch.Tensor  # (K,) int64 label id of each column of M
    counts: torch.Tensor  # (K,) int64
    M: torch.Tensor  # (d, K) float64
    num_labels: int
    unit_roundoff: float = 2.0**-53

    @property
    def K(self) -> int:
        return self.M.shape[1]

    @property
    def N(self) -> int:
        return int(self.counts.sum())

    def global_mean(self, convention: Convention) -> torch.Tensor:
        """mu_G, shape (d,): mean of class means or sample mean."""
        if convention.global_mean == "classes":
            return self.M.mean(dim=1)
        w = self.counts.to(ACC) / self.N
        return self.M @ w


@dataclass
class MeansGeometry:
    """What every formula needs from the class means, computed once per layer.

    Attributes:
        M: (d, K) the class means (ClassMeans.M, not a copy).
        mu: (d,) the global mean under the convention.
        s: (min(d, K),) singular values of M, descending.
        Q: (d, q) orthonormal basis of the numerical span of M: left singular vectors with
            s_i > K eps s_1 (float64 eps). One basis for NC1's projection, which must keep every
            direction the means really span to stay exact, and for nc3_span. When the means span
            all of R^d (q = d, as whenever K > d in general position) Q is the identity: any
            orthonormal basis of R^d gives the same values, and the identity saves pass 2 a
            (b, d) x (d, d) product per block.
        identity: whether Q is the identity (q = d).
        Mc: (d, K) centred means M - mu 1^T, made on first use (the metrics at the end of pass 2),
            so that pass 2 does not hold a second K x d copy of the means meanwhile.
    """

    M: torch.Tensor
    mu: torch.Tensor
    s: torch.Tensor
    Q: torch.Tensor
    identity: bool = False

    @functools.cached_property
    def Mc(self) -> torch.Tensor:
        return self.M - self.mu[:, None]

    @classmethod
    def of(cls, m: ClassMeans, conv: Convention) -> MeansGeometry:
        d = m.M.shape[0]
        U, s, _ = torch.linalg.svd(m.M, full_matrices=False)  # U (d, min(d, K)), s (min(d, K),)
        keep = s > torch.finfo(ACC).eps * m.K * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
        mu = m.global_mean(conv)
        if int(keep.sum()) == d:
            return cls(M=m.M, mu=mu, s=s, Q=torch.eye(d, dtype=ACC, device=m.M.device), identity=True)
        return cls(M=m.M, mu=mu, s=s, Q=U[:, keep])


def pinv_trace(C: torch.Tensor, Q: torch.Tensor, D: torch.Tensor, rtol: float,
               scale: torch.Tensor | None = None, floor: float = 0.0) -> tuple[float, int]:
    """tr(S B^+) for S = Q C Q^T (within scatter restricted to span Q) and B = D D^T.

    Q (d, q) is an orthonormal basis of the span of the class means, C (q, q) = sum_i
    (Q^T r_i)(Q^T r_i)^T, and D (d, K) are weighted centred means lying in span Q. A thin SVD of D
    (float64) gives B's non-zero eigenvalues s^2 and eigenvectors V, so B^+ = V diag(s^-2) V^T and
    tr(S B^+) = ||diag(1/s) V^T Q C^{1/2}||^2 = tr(A C A^T) with A = diag(1/s) V^T Q.

    Direction i is kept when s_i > rtol * s_1 and s_i > floor * sum_j |V_ji| scale_j: scale (d,)
    is the RMS of each feature under the weights of D, and floor = c u, so the second test drops
    the directions that the rounding of the stored features (relative u per entry) can create
    (docs/metrics.md section 3, "The cutoffs"). Returns the trace and the rank kept.
    """
    V, s, _ = torch.linalg.svd(D, full_matrices=False)  # V (d, m), s (m,), m = min(d, K)
    keep = s > rtol * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    if scale is not None and floor > 0:
        # Rounding noise along a unit v is at most u sum_j |v_j| q_j (docs/metrics.md); O(d m).
        keep &= s > floor * (V.abs().T @ scale)
    A = (V[:, keep].T @ Q) / s[keep][:, None]  # (r, q)
    return float(torch.einsum("rq,qp,rp->", A, C, A)), int(keep.sum())


def trace_metrics(m: ClassMeans, Mc: torch.Tensor, tr_W: float) -> dict[str, float]:
    """Trace forms of NC1 from the centred means Mc (d, K) and tr Sigma_W (pass 2).

    tr Sigma_T = (1/N) sum_i ||h_i - mu_G||^2 = tr Sigma_W + sum_k (n_k/N) ||mu_k - mu_G||^2 for
    any mu_G, because each class's residuals sum to zero: no extra pass over the rows, and a sum of
    non-negative terms, exact in the collapsed regime. Sigma_B weighs classes 1/K, so tr Sigma_W +
    tr Sigma_B = tr Sigma_T only when that reweighting changes nothing, e.g. balanced classes
    (docs/metrics.md section 5.2).

    Keys: tr_sigma_W, tr_sigma_B, nc1_trace (tr Sigma_W / tr Sigma_B), sigma_w_total and
    sigma_b_total (tr Sigma_W and tr Sigma_B over tr Sigma_T, Beaglehole et al. 2024).
    """
    sq = Mc.square().sum(0)  # (K,) ||mu_k - mu_G||^2
    tr_B = float(sq.sum()) / m.K
    tr_T = tr_W + float(sq @ m.counts.to(ACC)) / m.N
    return {"tr_sigma_W": tr_W, "tr_sigma_B": tr_B,
            "nc1_trace": tr_W / tr_B if tr_B > 0 else math.inf,
            "sigma_w_total": tr_W / tr_T if tr_T > 0 else math.nan,
            "sigma_b_total": tr_B / tr_T if tr_T > 0 else math.nan}


def cdnv(m: ClassMeans, ss: torch.Tensor) -> float:
    """Mean over class pairs k != j of (sigma_k^2 + sigma_j^2) / (2 ||mu_k - mu_j||^2).

    ss: (K,) per-class sums of squared residuals. Tiled over class pairs (no K x K matrix)."""
    var = ss / m.counts.to(ACC)  # (K,) sigma_k^2
    Mc = m.M - m.M.mean(dim=1, keepdim=True)  # distances only: any centring will do
    return PairSweep(m.M, Mc, var, 1.0, 1.0).run().cdnv.mean


def means_metrics(m: ClassMeans, geo: MeansGeometry, conv: Convention,
                  var: torch.Tensor | None = None) -> dict[str, float]:
    """NC2 family and every class-pair statistic from the class means (and, given var, the CDNVs).

    O(K^2 d) time in Gram tiles, O(K d + tile) memory: no K x K matrix (pairwise.py).

    Args:
        var: optional (K,) within-class variances sigma_k^2 = (1/n_k) sum_{y_i = k} ||r_i||^2;
            adds cdnv, cdnv_std, cdnv_max and cdnv_exp.

    Keys: nc2_etf (centred Gram vs simplex ETF), nc2_agop (mean squared deviation of the
    normalised centred means' Gram from the unit-diagonal simplex Gram), nc2_orth (uncentred Gram
    vs I/sqrt(K)), nc2_cond (sigma_max / sigma_min of M), equinorm (std/mean of ||mu_k - mu_G||),
    equiangle (std of pairwise cosines of centred means), interference_mean/_min/_max (their mean and
    extremes), mean_norm (average ||mu_k||), mean_norm_spread, max_cos_uncentred, nc2g_dist_*,
    nc2g_log_*, nc2g_riesz_* (hyperspherical uniformity of the normalised centred means),
    rank_means (#{sigma_i(M) > means_rank_rtol sigma_1}) and sv_means_i (singular values of M,
    i = 1..min(d, K), descending).
    """
    K = m.K
    out: dict[str, float] = {}
    sweep = PairSweep(m.M, geo.Mc, var, conv.riesz_exponent(m.M.shape[0]), conv.cdnv_exponent).run()
    norms_c, norms = sweep.norms_c, sweep.norms
    if K >= 2:
        # The diagonal of the normalised centred Gram against the ETF's (1 - 1/K)/sqrt(K - 1).
        diag = (norms_c.square() / sweep.nGc - (1 - 1 / K) / math.sqrt(K - 1)).square().sum()
        out["nc2_etf"] = math.sqrt(sweep.etf_ss + float(diag)) if sweep.nGc > 0 else math.nan
        # Beaglehole et al.'s NC2, mean over all K^2 entries of (u_k.u_j - E_kj)^2: the diagonal
        # u_k.u_k = 1 = E_kk, except for a class whose centred mean is 0 (u_k = 0, as in its
        # cosines), which counts (0 - 1)^2.
        out["nc2_agop"] = (sweep.agop_ss + float((norms_c == 0).sum())) / K**2
    diag = (norms.square() / sweep.nG - 1 / math.sqrt(K)).square().sum() if sweep.nG > 0 else 0.0
    out["nc2_orth"] = math.sqrt(sweep.orth_ss + float(diag)) if sweep.nG > 0 else math.nan
    s = geo.s  # (min(d, K),) descending
    out["nc2_cond"] = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    out["equinorm"] = float(norms_c.std(correction=0) / norms_c.mean()) if norms_c.mean() > 0 else math.nan
    out["equiangle"] = sweep.cos.std if K > 2 else 0.0
    out["interference_mean"] = sweep.cos.mean
    out["interference_min"] = sweep.cos.lo
    out["interference_max"] = sweep.cos.hi
    out["mean_norm"] = float(norms.mean())
    out["mean_norm_spread"] = float(norms.std(correction=0) / norms.mean()) if norms.mean() > 0 else math.nan
    out["max_cos_uncentred"] = sweep.max_cos
    out["nc2g_dist_mean"] = sweep.dist.mean
    out["nc2g_dist_std"] = sweep.dist.std
    out["nc2g_log_mean"] = sweep.log_kernel.mean
    out["nc2g_log_std"] = sweep.log_kernel.std
    out["nc2g_riesz_logmean"] = sweep.riesz.log_mean
    out["nc2g_riesz_cv"] = sweep.riesz.cv
    if var is not None:
        out["cdnv"] = sweep.cdnv.mean
        out["cdnv_std"] = sweep.cdnv.std
        out["cdnv_max"] = sweep.cdnv.hi
        out["cdnv_exp"] = sweep.cdnv_exp.mean
    out["rank_means"] = float((s > conv.means_rank_rtol * s[0]).sum()) if s[0] > 0 else 0.0
    for i, v in enumerate(s.tolist(), start=1):
        out[f"sv_means_{i}"] = v
    return out


def spectra(scatter: torch.Tensor, m: ClassMeans, geo: MeansGeometry, conv: Convention) -> dict[str, float]:
    """Sigma_W spectrum summary and effective rank of the centred features (O(d^3))."""
    N = m.N
    ev_W = torch.linalg.eigvalsh(scatter / N).flip(0).clamp_min(0)  # (d,) descending
    D = geo.Mc
    total = scatter + (D * m.counts.to(ACC)) @ D.T  # (d, d) centred scatter
    sv = torch.linalg.eigvalsh(total).clamp_min(0).sqrt()  # singular values of centred H
    p = sv / sv.sum()
    p = p[p > 0]
    out = {
        "sigma_W_max_eig": float(ev_W[0]),
        "rank_sigma_W": float((ev_W > conv.means_rank_rtol * ev_W[0]).sum()) if ev_W[0] > 0 else 0.0,
        "erank_centred": float(torch.exp(-(p * p.log()).sum())),
        "erank_ceiling": float(min(N - 1, m.M.shape[0])),
    }
    return out
