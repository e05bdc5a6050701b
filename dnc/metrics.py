"""Collapse metrics of one layer: streaming accumulators apart from pure formulas.

Definitions and conventions follow metrics.md. Features are rows h_i in R^d with labels y_i;
M = [mu_1 .. mu_K] (d x K) are the class means, mu_G the global mean (mean of class means by
default), M~ = M - mu_G 1^T the centred means.

* Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (1/N, never N - 1).
* Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T.
* nc1_pinv = tr(Sigma_W Sigma_B^+) / K (Papyan et al. 2020 with the /K of Zhu et al. 2021);
  he_su_D = tr(SS_W SS_B^+) (He & Su 2023) with SS_W = N Sigma_W, SS_B = sum_k n_k d_k d_k^T.
* nc1_trace = tr(Sigma_W) / tr(Sigma_B) (textbook 1/N; Beaglehole et al.'s code is 1/K of this).
* cdnv: mean over k != j of (sigma_k^2 + sigma_j^2) / (2 ||mu_k - mu_j||^2) (Galanti et al. 2022).
* nc2_etf, nc2_orth, nc2_cond, equinorm, equiangle, rank_means, sv_means_i (Papyan et al.).
* nc3 (Papyan, centred, last layer), nc3_uncentred, nc3_span, nc3_rowalign (Rangamani et al.).
* nc4: nearest-class-centre prediction differs from the model's prediction.

Exactness and speed (metrics.md section 4): tr(Sigma_W Sigma_B^+) is computed inside the span of
the centred class means. A thin SVD of M~ (d x K, float64) gives an orthonormal basis V of that span
and Sigma_B's non-zero eigenvalues e = s^2 / K, kept above an explicit relative threshold; then
tr(Sigma_W Sigma_B^+) = (1/N) sum_i ||diag(e)^{-1/2} V^T (h_i - mu_{y_i})||^2: O(N d K), no d x d
matrix, no pseudo-inverse. Two passes (means, then residuals) keep the within-class sums exact in
the collapsed regime where one-pass E||x||^2 - ||mu||^2 loses every digit. All accumulation is
float64 whatever the input dtype; the device is the input's (CPU or CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Convention",
    "ClassMeanAccumulator",
    "ResidualAccumulator",
    "layer_metrics",
    "metrics_from_chunks",
    "means_metrics",
    "weight_metrics",
    "check_finite",
]

ACC = torch.float64


@dataclass(frozen=True)
class Convention:
    """Choices that change metric values; recorded next to every value in the output tables.

    Attributes:
        global_mean: "classes" (mean of class means; Papyan et al.) or "samples" (sample mean).
        rank_rtol: singular values of M~ below rank_rtol * s_max are treated as zero when forming
            Sigma_B^+ (the reported rank_sigma_B says how many were kept).
        means_rank_rtol: threshold of the numerical rank of M (dufm-theory.md uses 1e-3).
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


def _as_tensor(x: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if device is None else t.to(device)


def check_finite(x: torch.Tensor, name: str, row_offset: int = 0) -> None:
    """Raise ValueError naming the layer and the first row holding NaN or inf."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(x.shape[0], -1).any(dim=1).nonzero()
        row = int(rows[0]) + row_offset
        raise ValueError(f"features of {name!r} hold NaN or inf at row {row} (0-based)")


class ClassMeanAccumulator:
    """Pass 1: per-class counts and float64 sums.

    accumulate(features (b, d), labels (b,)) any number of times, then compute() -> ClassMeans.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu",
                 name: str = "layer") -> None:
        self.K, self.d, self.name = num_classes, dim, name
        self.device = torch.device(device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(num_classes, dim, dtype=ACC, device=self.device)
        self.rows = 0

    def accumulate(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add one chunk: features (b, d) of any float dtype, labels (b,) in [0, num_classes)."""
        H = _as_tensor(features, self.device)
        y = _as_tensor(labels, self.device).long()
        _check_chunk(H, y, self.K, self.d, self.name)
        self.counts += torch.bincount(y, minlength=self.K)
        for i, j in _blocks(H):
            self.sums.index_add_(0, y[i:j], H[i:j].to(ACC))  # (K, d) += one-hot^T H, float64
        # NaN/inf in the chunk propagate into the sums: check K x d numbers, not b x d.
        if not bool(torch.isfinite(self.sums).all()):
            check_finite(H, self.name, self.rows)
            raise OverflowError(f"{self.name!r}: class sums overflow float64 (features near 1e308)")
        self.rows += H.shape[0]

    def compute(self) -> ClassMeans:
        present = self.counts > 0
        if int(present.sum()) < 2:
            raise ValueError(f"{self.name!r}: need samples of at least 2 classes, "
                             f"got counts {self.counts.tolist()}")
        return ClassMeans(
            classes=present.nonzero().flatten(),
            counts=self.counts[present],
            M=(self.sums[present] / self.counts[present, None].to(ACC)).T.contiguous(),  # (d, K)
            num_labels=self.K,
        )


BLOCK_ELEMENTS = 1 << 20  # float64 work blocks of 8 MiB stay in cache on CPU


def _blocks(H: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges of cache-sized blocks on CPU (about 5x faster than whole-chunk ops, which are
    memory-bound at d in the thousands); one block on CUDA, where large kernels win."""
    b = H.shape[0]
    step = b if H.is_cuda else max(1, BLOCK_ELEMENTS // max(1, H.shape[1]))
    return [(i, min(i + step, b)) for i in range(0, b, step)]


def _check_chunk(H: torch.Tensor, y: torch.Tensor, K: int, d: int, name: str) -> None:
    if H.ndim != 2 or H.shape[1] != d:
        raise ValueError(f"{name!r}: features must be (b, {d}), got {tuple(H.shape)}")
    if y.shape != (H.shape[0],):
        raise ValueError(f"{name!r}: labels must be ({H.shape[0]},), got {tuple(y.shape)}")
    if not H.is_floating_point():
        raise ValueError(f"{name!r}: features must be floating point, got {H.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"{name!r}: labels must lie in [0, {K}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


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


def _pinv_trace(C: torch.Tensor, Q: torch.Tensor, D: torch.Tensor, rtol: float) -> tuple[float, int]:
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


class ResidualAccumulator:
    """Pass 2: within-class sums given the pass-1 means.

    Accumulates per class sum ||h_i - mu_{y_i}||^2 and the q x q matrix C = sum_i (Q^T r_i)(Q^T
    r_i)^T of the residuals r_i = h_i - mu_{y_i} projected on an orthonormal basis Q (d x q, q <= K)
    of the span of the class means: every Sigma_B^+ lives in that span, so C suffices for both
    global-mean conventions and for He & Su's weighted SS_B. Nearest-class-centre distances are
    read off the same projection (the part of h outside span Q is the same for every class), so
    NC4 costs no extra GEMM. Optionally the d x d scatter r^T r (spectra).
    """

    def __init__(self, means: ClassMeans, convention: Convention = Convention(),
                 name: str = "layer") -> None:
        self.means, self.conv, self.name = means, convention, name
        K, d, dev = means.K, means.M.shape[0], means.M.device
        U, s, _ = torch.linalg.svd(means.M, full_matrices=False)  # U (d, K)
        self.Q = U[:, s > torch.finfo(ACC).eps * K * s[0]] if s[0] > 0 else U[:, :0]  # (d, q)
        self.QM = self.Q.T @ means.M  # (q, K) class means in the basis
        # Label id -> column of M (-1 for classes without samples).
        self.col = torch.full((means.num_labels,), -1, dtype=torch.int64, device=dev)
        self.col[means.classes] = torch.arange(K, device=dev)
        self.Mt = means.M.T.contiguous()  # (K, d)
        self.ss = torch.zeros(K, dtype=ACC, device=dev)
        self.C = torch.zeros(self.Q.shape[1], self.Q.shape[1], dtype=ACC, device=dev)
        self.ncc_wrong = 0
        self.nc4_diff = 0
        self.nc4_rows = 0
        self.scatter = torch.zeros(d, d, dtype=ACC, device=dev) if convention.spectra else None
        self.rows = 0

    def accumulate(self, features, labels, predictions=None) -> None:
        """Add one chunk: features (b, d), labels (b,), optional model predictions (b,)."""
        H = _as_tensor(features, self.means.M.device)
        y = _as_tensor(labels, H.device).long()
        _check_chunk(H, y, self.means.num_labels, self.means.M.shape[0], self.name)
        c = self.col[y]  # (b,) column of each sample's class
        if bool((c < 0).any()):
            raise ValueError(f"{self.name!r}: pass 2 saw a label absent in pass 1")
        pred = None if predictions is None else _as_tensor(predictions, H.device).long()
        ss_before = self.ss.sum()
        for i, j in _blocks(H):
            cb = c[i:j]
            R = H[i:j].to(ACC, copy=True)  # (b, d) float64 copy of the block ...
            R.sub_(self.Mt.index_select(0, cb))  # ... minus its class means: residuals
            P = R @ self.Q  # (b, q)
            self.C.addmm_(P.T, P)
            if self.scatter is not None:
                self.scatter.addmm_(R.T, R)  # (d, d)
            self.ss.index_add_(0, cb, torch.linalg.vector_norm(R, dim=1).square_())
            # Nearest class centre inside span Q: Q^T h = P + Q^T mu_y.
            Ph = P + self.QM.T[cb]  # (b, q)
            dist = (Ph * Ph).sum(1, keepdim=True) - 2 * Ph @ self.QM + (self.QM**2).sum(0)  # (b, K)
            ncc = dist.argmin(dim=1)
            self.ncc_wrong += int((ncc != cb).sum())
            if pred is not None:
                self.nc4_diff += int((self.means.classes[ncc] != pred[i:j]).sum())
        if pred is not None:
            self.nc4_rows += pred.shape[0]
        if not bool(torch.isfinite(self.ss.sum() - ss_before)):
            check_finite(H, self.name, self.rows)
        self.rows += H.shape[0]

    def compute(self, weight: torch.Tensor | np.ndarray | None = None) -> dict[str, float]:
        """All metrics of the layer as a flat name -> float mapping."""
        m, conv = self.means, self.conv
        if self.rows != m.N:
            raise ValueError(f"{self.name!r}: pass 2 saw {self.rows} rows, pass 1 saw {m.N}")
        N, K = m.N, m.K
        out: dict[str, float] = {"num_samples": float(N), "num_classes": float(K)}
        tr_W = float(self.ss.sum()) / N
        Mc = m.M - m.global_mean(conv)[:, None]  # (d, K)
        # Sigma_B = (1/K) Mc Mc^T: D = Mc / sqrt(K).
        tr, rank = _pinv_trace(self.C, self.Q, Mc / math.sqrt(K), conv.rank_rtol)
        out["nc1_pinv"] = tr / N / K
        out["rank_sigma_B"] = float(rank)
        # He & Su: tr(Sigma_W Sigma^_B^+), Sigma^_B = (1/N) sum_k n_k (mu_k - mu)(mu_k - mu)^T
        # with the sample mean mu; equals K nc1_pinv for balanced classes.
        w = m.counts.to(ACC) / N
        Ds = (m.M - (m.M @ w)[:, None]) * w.sqrt()  # (d, K)
        out["he_su_D"] = _pinv_trace(self.C, self.Q, Ds, conv.rank_rtol)[0] / N
        tr_B = float((Mc**2).sum()) / K
        out["tr_sigma_W"] = tr_W
        out["tr_sigma_B"] = tr_B
        out["nc1_trace"] = tr_W / tr_B if tr_B > 0 else math.inf
        out["cdnv"] = _cdnv(m, self.ss)
        out["ncc_error"] = self.ncc_wrong / N
        if self.nc4_rows:
            out["nc4"] = self.nc4_diff / self.nc4_rows
        out.update(means_metrics(m, conv))
        if weight is not None:
            out.update(weight_metrics(_as_tensor(weight, m.M.device), m, conv))
        if self.scatter is not None:
            out.update(_spectra(self.scatter, m, conv))
        return out


def _cdnv(m: ClassMeans, ss: torch.Tensor) -> float:
    """Mean over class pairs k != j of (sigma_k^2 + sigma_j^2) / (2 ||mu_k - mu_j||^2)."""
    var = ss / m.counts.to(ACC)  # (K,) sigma_k^2
    G = m.M.T @ m.M  # (K, K)
    dist2 = G.diagonal()[:, None] + G.diagonal()[None, :] - 2 * G  # (K, K)
    iu = torch.triu_indices(m.K, m.K, offset=1, device=G.device)
    num = (var[:, None] + var[None, :])[iu[0], iu[1]]
    den = 2 * dist2[iu[0], iu[1]].clamp_min(0)
    vals = torch.where(den > 0, num / den, torch.where(num > 0, math.inf, 0.0))
    return float(vals.mean())


def means_metrics(m: ClassMeans, conv: Convention) -> dict[str, float]:
    """NC2 family from the class means alone: (d x K) work, no sample access.

    Keys: nc2_etf (centred Gram vs simplex ETF), nc2_orth (uncentred Gram vs I/sqrt(K)),
    nc2_cond (sigma_max / sigma_min of M), equinorm (std/mean of ||mu_k - mu_G||), equiangle
    (std of pairwise cosines of centred means), mean_norm (average ||mu_k||), max_cos_uncentred,
    rank_means (#{sigma_i(M) > means_rank_rtol sigma_1}) and sv_means_i (singular values of M,
    i = 1..K, descending).
    """
    K = m.K
    out: dict[str, float] = {}
    Mc = m.M - m.global_mean(conv)[:, None]
    Gc = Mc.T @ Mc  # (K, K)
    if K >= 2:
        target = (torch.eye(K, dtype=ACC, device=Gc.device) - 1.0 / K) / math.sqrt(K - 1)
        nGc = torch.linalg.matrix_norm(Gc)
        out["nc2_etf"] = float(torch.linalg.matrix_norm(Gc / nGc - target)) if nGc > 0 else math.nan
    G = m.M.T @ m.M
    nG = torch.linalg.matrix_norm(G)
    eye = torch.eye(K, dtype=ACC, device=G.device)
    out["nc2_orth"] = float(torch.linalg.matrix_norm(G / nG - eye / math.sqrt(K))) if nG > 0 else math.nan
    s = torch.linalg.svdvals(m.M)  # (K,) descending
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


def weight_metrics(W: torch.Tensor, m: ClassMeans, conv: Convention) -> dict[str, float]:
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
    U, s, _ = torch.linalg.svd(m.M, full_matrices=False)  # U (d, K)
    Q = U[:, s > conv.rank_rtol * s[0]]  # orthonormal basis of span(M)
    out["nc3_span"] = float(torch.linalg.matrix_norm(W - (W @ Q) @ Q.T) / nW)
    rn = W.norm(dim=1)  # (d_out,)
    cos = (W @ m.M) / (rn[:, None] * m.M.norm(dim=0)[None, :]).clamp_min(torch.finfo(ACC).tiny)
    out["nc3_rowalign"] = float((rn * cos.abs().max(dim=1).values).sum() / rn.sum())
    if W.shape[0] == m.K and m.num_labels == m.K:
        Mc = m.M - m.global_mean(conv)[:, None]
        out["nc3"] = float(torch.linalg.matrix_norm(W / nW - Mc.T / torch.linalg.matrix_norm(Mc)))
        out["nc3_uncentred"] = float(
            torch.linalg.matrix_norm(W / nW - m.M.T / torch.linalg.matrix_norm(m.M))
        )
    return out


def _spectra(scatter: torch.Tensor, m: ClassMeans, conv: Convention) -> dict[str, float]:
    """Sigma_W spectrum summary and effective rank of the centred features (O(d^3))."""
    N = m.N
    ev_W = torch.linalg.eigvalsh(scatter / N).flip(0).clamp_min(0)  # (d,) descending
    D = m.M - m.global_mean(conv)[:, None]
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


def metrics_from_chunks(
    chunks: Callable[[], Iterable[tuple]],
    num_classes: int,
    dim: int,
    weight=None,
    convention: Convention = Convention(),
    name: str = "layer",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Two streaming passes over chunks (features (b, d), labels (b,)[, predictions (b,)]).

    chunks is a zero-argument callable returning a fresh iterator (it is called twice).
    """
    acc = ClassMeanAccumulator(num_classes, dim, device=device, name=name)
    for ch in chunks():
        acc.accumulate(ch[0], ch[1])
    res = ResidualAccumulator(acc.compute(), convention, name=name)
    for ch in chunks():
        res.accumulate(ch[0], ch[1], ch[2] if len(ch) > 2 else None)
    return res.compute(weight)


def layer_metrics(
    features,
    labels,
    weight=None,
    predictions=None,
    convention: Convention | None = None,
    name: str = "layer",
) -> dict[str, float]:
    """All metrics of one layer from in-memory features.

    Args:
        features: (N, d) array or tensor of any float dtype (CPU or CUDA).
        labels: (N,) integer class labels; classes with no sample are ignored.
        weight: optional (d_out, d) weight applied to these features (NC3 family).
        predictions: optional (N,) model predictions (NC4).
        convention: metric conventions (defaults: Convention()).
        name: used in error messages.

    Returns:
        Mapping metric name -> float with at least nc1_pinv, nc1_trace, cdnv, nc2_etf,
        nc2_orth, rank_means and, when weight is given, nc3_span, nc3_rowalign (and nc3 for a
        classifier, d_out = K).
    """
    conv = convention or Convention()
    H = _as_tensor(features)
    y = _as_tensor(labels, H.device).long()
    if H.ndim != 2:
        raise ValueError(f"{name!r}: features must be (N, d), got {tuple(H.shape)}")
    K = int(y.max()) + 1 if y.numel() else 0
    chunk = [(H, y) if predictions is None else (H, y, predictions)]
    return metrics_from_chunks(lambda: iter(chunk), K, H.shape[1], weight, conv, name, H.device)
