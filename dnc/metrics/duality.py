"""The NC3 family as pure formulas: how a layer's weight W (d_out x d) lines up with the class means
of its input (self-duality, Papyan et al.; Kothapalli's nc3_etf and uniform duality), from the
reduced pass-1 state. Definitions: docs/metrics.md. Nothing here touches files or streams.
"""

from __future__ import annotations

import math

import torch

from dnc.metrics.formulas import ACC, ClassMeans, MeansGeometry
from dnc.metrics.pairwise import row_tiles

__all__ = ["weight_metrics", "is_classifier"]


def is_classifier(W: torch.Tensor, m: ClassMeans, classifier: bool | None) -> bool:
    """Whether W maps these features to the logits: as told, else when it has one row per label."""
    return W.shape[0] == m.num_labels and (classifier is None or bool(classifier))


def weight_metrics(W: torch.Tensor, m: ClassMeans, geo: MeansGeometry,
                   classifier: bool | None = None) -> dict[str, float]:
    """NC3 family for the weight W (d_out x d) applied to this layer's features.

    Keys: nc3_span = ||W (I - P_M)||_F / ||W||_F (share of W outside span of the uncentred class
    means), nc3_rowalign = sum_rows ||w_r|| max_k |cos(w_r, mu_k)| / sum_rows ||w_r||, and, when
    d_out = K (a classifier), nc3 = ||W/||W||_F - M~^T/||M~||_F||_F (Papyan, centred, not squared)
    and nc3_uncentred (same with M, the bias-free DUFM prediction).

    When W is the classifier (classifier=True, or None and d_out = the number of labels), with
    W_p its rows of the K classes present: nc3_etf = ||W_p M~/||W_p M~||_F - ETF||_F (Kothapalli's
    form; ETF = (I - 11^T/K)/sqrt(K - 1)), nc3_dual_cos_mean and nc3_uniform_duality (mean and
    population std over classes of cos(w_k, mu_k - mu_G)). K x K products are tiled.
    """
    W = W.to(ACC)
    if W.ndim != 2 or W.shape[1] != m.M.shape[0]:
        raise ValueError(f"weight must be (d_out, {m.M.shape[0]}), got {tuple(W.shape)}")
    out: dict[str, float] = {}
    nW = torch.linalg.matrix_norm(W)
    Q = geo.Q  # orthonormal basis of span(M)
    out["nc3_span"] = 0.0 if geo.identity else float(torch.linalg.matrix_norm(W - (W @ Q) @ Q.T) / nW)
    rn = W.norm(dim=1)  # (d_out,)
    mn = m.M.norm(dim=0)  # (K,)
    tiny = torch.finfo(ACC).tiny
    best = torch.cat([((W[i0:i1] @ m.M) / (rn[i0:i1, None] * mn[None, :]).clamp_min(tiny)).abs().amax(dim=1)
                      for i0, i1 in row_tiles(W.shape[0], m.K)])  # (d_out,) max_k |cos(w_r, mu_k)|
    out["nc3_rowalign"] = float((rn * best).sum() / rn.sum())
    Mc = geo.Mc
    if W.shape[0] == m.K and m.num_labels == m.K:
        out["nc3"] = float(torch.linalg.matrix_norm(W / nW - Mc.T / torch.linalg.matrix_norm(Mc)))
        out["nc3_uncentred"] = float(
            torch.linalg.matrix_norm(W / nW - m.M.T / torch.linalg.matrix_norm(m.M))
        )
    if is_classifier(W, m, classifier):
        out.update(_classifier_means_metrics(W[m.classes], Mc))
    return out


def _classifier_means_metrics(Wp: torch.Tensor, Mc: torch.Tensor) -> dict[str, float]:
    """nc3_etf and the uniform-duality pair for classifier rows Wp (K, d) and centred means Mc (d, K)."""
    K = Mc.shape[1]
    out: dict[str, float] = {}
    cos = (Wp * Mc.T).sum(1) / (Wp.norm(dim=1) * Mc.norm(dim=0)).clamp_min(torch.finfo(ACC).tiny)
    out["nc3_dual_cos_mean"] = float(cos.mean())
    out["nc3_uniform_duality"] = float(cos.std(correction=0))
    if K < 2:
        return out
    # ||Wp Mc||_F: from the K x K product itself when K <= d, else from the d x d factors
    # <Wp^T Wp, Mc Mc^T>, an exact float64 sum either way and never a K x K matrix for K > d.
    if K <= Mc.shape[0]:
        nZ2 = sum(float((Wp[i0:i1] @ Mc).square().sum()) for i0, i1 in row_tiles(K, K))
    else:
        nZ2 = float(((Wp.T @ Wp) * (Mc @ Mc.T)).sum())
    if nZ2 <= 0:
        out["nc3_etf"] = math.nan
        return out
    nZ = math.sqrt(nZ2)
    a, b = 1.0 / (K * math.sqrt(K - 1)), 1.0 / math.sqrt(K - 1)  # ETF = b I - a 11^T
    ss = 0.0
    for i0, i1 in row_tiles(K, K):
        Z = (Wp[i0:i1] @ Mc) / nZ + a  # (t, K): minus the ETF off the diagonal
        idx = torch.arange(i1 - i0, device=Z.device)
        Z[idx, idx + i0] -= b
        ss += float(Z.square().sum())
    out["nc3_etf"] = math.sqrt(ss)
    return out
