"""Collapse measures as pure formulas of reduced quantities: class means, within-class sums and a
layer's weight. Nothing here touches files or streams; dnc.metrics.accumulators produces the inputs.

Definitions, conventions and sources of every measure: docs/metrics.md. Notation: M = [mu_1 .. mu_K]
(d x K) class means, mu_G the global mean, M~ = M - mu_G 1^T the centred means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Convention", "ClassMeans", "MeansGeometry", "pinv_trace", "cdnv", "means_metrics",
           "weight_metrics", "spectra"]

ACC = torch.float64


@dataclass(frozen=True)
class Convention:
    """Choices that change metric values; recorded next to every value in the output tables.

    Attributes:
        global_mean: "classes" (mean of class means; Papyan et al.) or "samples" (sample mean).
        rank_rtol: singular values of the centred means below rank_rtol * s_max are treated as
            zero when forming Sigma_B^+ (the reported rank_sigma_B says how many were kept).
        means_rank_rtol: threshold of the numerical rank of M (docs/metrics.md; 1e-3 as in
            Súkeník et al. 2024).
        spectra: also accumulate the d x d within-class scatter for the Sigma_W spectrum and the
            effective rank (O(N d^2) time, O(d^2) memory, two O(d^3) eigendecompositions; 23x the
            default set's time at N = 50,000, d = 2048 on 2 CPU cores: off by default).
    """

    global_mean: str = "classes"
    rank_rtol: float = 1e-10
    means_rank_rtol: float = 1e-3
    spectra: bool = False

    def __post_init__(self) -> None:
        if self.global_mean not in ("classes", "samples"):
            raise ValueError(f"global_mean must be 'classes' or 'samples', got {self.global_mean!r}")

    def describe(self) -> str:
        """Short text stored in the 'convention' column of metric tables."""
        return (
            f"muG={self.global_mean};SigmaW=1/N;nc1_pinv=/K;cdnv=sq;nc3=papyan-unsquared;"
            f"rank_rtol={self.rank_rtol:g};means_rank_rtol={self.means_rank_rtol:g}"
        )


@dataclass
class ClassMeans:
    """Reduced pass-1 state. M is (d, K) over the K classes present; classes maps to label ids."""

    classes: torch.Tensor  # (K,) int64 label id of each column of M
    counts: torch.Tensor  # (K,) int64
    M: torch.Tensor  # (d, K) float64
    num_labels: int

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
        Mc: (d, K) centred means M - mu_G 1^T under the convention's global mean.
        s: (K,) singular values of M, descending.
        Q: (d, q) orthonormal basis of the numerical span of M: left singular vectors with
            s_i > K eps s_1 (float64 eps). One basis for NC1's projection, which must keep every
            direction the means really span to stay exact, and for nc3_span.
    """

    Mc: torch.Tensor
    s: torch.Tensor
    Q: torch.Tensor

    @classmethod
    def of(cls, m: ClassMeans, conv: Convention) -> MeansGeometry:
        U, s, _ = torch.linalg.svd(m.M, full_matrices=False)  # U (d, K), s (K,)
        Q = U[:, s > torch.finfo(ACC).eps * m.K * s[0]] if s[0] > 0 else U[:, :0]
        return cls(Mc=m.M - m.global_mean(conv)[:, None], s=s, Q=Q)


def pinv_trace(C: torch.Tensor, Q: torch.Tensor, D: torch.Tensor, rtol: float) -> tuple[float, int]:
    """tr(S B^+) for S = Q C Q^T (within scatter restricted to span Q) and B = D D^T.

    Q (d, q) is an orthonormal basis of the span of the class means, C (q, q) = sum_i
    (Q^T r_i)(Q^T r_i)^T, and D (d, K) are weighted centred means lying in span Q. A thin SVD of D
    (float64) gives B's non-zero eigenvalues s^2 (kept above rtol * s_max in s) and eigenvectors V,
    so B^+ = V diag(s^-2) V^T and tr(S B^+) = ||diag(1/s) V^T Q C^{1/2}||^2 = tr(A C A^T) with
    A = diag(1/s) V^T Q. Returns the trace and the rank kept.
    """
    V, s, _ = torch.linalg.svd(D, full_matrices=False)  # V (d, K), s (K,)
    keep = s > rtol * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    A = (V[:, keep].T @ Q) / s[keep][:, None]  # (r, q)
    return float(torch.einsum("rq,qp,rp->", A, C, A)), int(keep.sum())


def cdnv(m: ClassMeans, ss: torch.Tensor) -> float:
    """Mean over class pairs k != j of (sigma_k^2 + sigma_j^2) / (2 ||mu_k - mu_j||^2)."""
    var = ss / m.counts.to(ACC)  # (K,) sigma_k^2
    G = m.M.T @ m.M  # (K, K)
    dist2 = G.diagonal()[:, None] + G.diagonal()[None, :] - 2 * G  # (K, K)
    iu = torch.triu_indices(m.K, m.K, offset=1, device=G.device)
    num = (var[:, None] + var[None, :])[iu[0], iu[1]]
    den = 2 * dist2[iu[0], iu[1]].clamp_min(0)
    vals = torch.where(den > 0, num / den, torch.where(num > 0, math.inf, 0.0))
    return float(vals.mean())


def means_metrics(m: ClassMeans, geo: MeansGeometry, conv: Convention) -> dict[str, float]:
    """NC2 family from the class means alone: (d x K) work, no sample access.

    Keys: nc2_etf (centred Gram vs simplex ETF), nc2_orth (uncentred Gram vs I/sqrt(K)),
    nc2_cond (sigma_max / sigma_min of M), equinorm (std/mean of ||mu_k - mu_G||), equiangle
    (std of pairwise cosines of centred means), mean_norm (average ||mu_k||), max_cos_uncentred,
    rank_means (#{sigma_i(M) > means_rank_rtol sigma_1}) and sv_means_i (singular values of M,
    i = 1..K, descending).
    """
    K = m.K
    out: dict[str, float] = {}
    Mc = geo.Mc
    Gc = Mc.T @ Mc  # (K, K)
    if K >= 2:
        target = (torch.eye(K, dtype=ACC, device=Gc.device) - 1.0 / K) / math.sqrt(K - 1)
        nGc = torch.linalg.matrix_norm(Gc)
        out["nc2_etf"] = float(torch.linalg.matrix_norm(Gc / nGc - target)) if nGc > 0 else math.nan
    G = m.M.T @ m.M
    nG = torch.linalg.matrix_norm(G)
    eye = torch.eye(K, dtype=ACC, device=G.device)
    out["nc2_orth"] = float(torch.linalg.matrix_norm(G / nG - eye / math.sqrt(K))) if nG > 0 else math.nan
    s = geo.s  # (K,) descending
    out["nc2_cond"] = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    norms_c = Mc.norm(dim=0)
    out["equinorm"] = float(norms_c.std(correction=0) / norms_c.mean()) if norms_c.mean() > 0 else math.nan
    iu = torch.triu_indices(K, K, offset=1, device=G.device)
    cos_c = Gc / (norms_c[:, None] * norms_c[None, :]).clamp_min(torch.finfo(ACC).tiny)
    out["equiangle"] = float(cos_c[iu[0], iu[1]].std(correction=0)) if K > 2 else 0.0
    norms = m.M.norm(dim=0)
    out["mean_norm"] = float(norms.mean())
    out["mean_norm_spread"] = float(norms.std(correction=0) / norms.mean()) if norms.mean() > 0 else math.nan
    cos = G / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(ACC).tiny)
    out["max_cos_uncentred"] = float(cos[iu[0], iu[1]].max())
    out["rank_means"] = float((s > conv.means_rank_rtol * s[0]).sum()) if s[0] > 0 else 0.0
    for i, v in enumerate(s.tolist(), start=1):
        out[f"sv_means_{i}"] = v
    return out


def weight_metrics(W: torch.Tensor, m: ClassMeans, geo: MeansGeometry) -> dict[str, float]:
    """NC3 family for the weight W (d_out x d) applied to this layer's features.

    Keys: nc3_span = ||W (I - P_M)||_F / ||W||_F (share of W outside span of the uncentred class
    means), nc3_rowalign = sum_rows ||w_r|| max_k |cos(w_r, mu_k)| / sum_rows ||w_r||, and, when
    d_out = K (a classifier), nc3 = ||W/||W||_F - M~^T/||M~||_F||_F (Papyan, centred, not squared)
    and nc3_uncentred (same with M, the bias-free DUFM prediction).
    """
    W = W.to(ACC)
    if W.ndim != 2 or W.shape[1] != m.M.shape[0]:
        raise ValueError(f"weight must be (d_out, {m.M.shape[0]}), got {tuple(W.shape)}")
    out: dict[str, float] = {}
    nW = torch.linalg.matrix_norm(W)
    Q = geo.Q  # orthonormal basis of span(M)
    out["nc3_span"] = float(torch.linalg.matrix_norm(W - (W @ Q) @ Q.T) / nW)
    rn = W.norm(dim=1)  # (d_out,)
    cos = (W @ m.M) / (rn[:, None] * m.M.norm(dim=0)[None, :]).clamp_min(torch.finfo(ACC).tiny)
    out["nc3_rowalign"] = float((rn * cos.abs().max(dim=1).values).sum() / rn.sum())
    if W.shape[0] == m.K and m.num_labels == m.K:
        Mc = geo.Mc
        out["nc3"] = float(torch.linalg.matrix_norm(W / nW - Mc.T / torch.linalg.matrix_norm(Mc)))
        out["nc3_uncentred"] = float(
            torch.linalg.matrix_norm(W / nW - m.M.T / torch.linalg.matrix_norm(m.M))
        )
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
