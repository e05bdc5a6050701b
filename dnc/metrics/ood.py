"""NC5: orthogonality of out-of-distribution features to the in-distribution class means.

Ammar et al. (NECO, ICLR 2024) observe that, as collapse sets in, the features of
out-of-distribution (OOD) inputs become orthogonal to the span of the in-distribution (ID) class
means; rhubarbwu/neural-collapse measures it as the mean over ID classes of |cos(mu_k, mu_OOD)|
with mu_OOD the OOD global mean. One streaming pass over the OOD features accumulates mu_OOD in
float64; the ID class means come from pass 1 of the ID data (ClassMeanAccumulator). Definitions:
docs/metrics.md section 5.7. Feature files are read by dnc.metrics.streaming (feature_file_ood_metrics,
ood_file_metrics).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from dnc.metrics.formulas import ACC, ClassMeans, Convention

__all__ = ["OODAccumulator", "ood_metrics"]


class OODAccumulator:
    """Sum and count of OOD features (labels, if any, are ignored: OOD classes are not ID classes).

    accumulate(features (b, d)) any number of times, then compute() -> dict with nc5,
    nc5_centred, nc5_max and ood_num_samples.
    """

    def __init__(self, means: ClassMeans, convention: Convention = Convention(),
                 name: str = "ood") -> None:
        self.means, self.conv, self.name = means, convention, name
        self.d = means.M.shape[0]
        self.sum = torch.zeros(self.d, dtype=ACC, device=means.M.device)
        self.rows = 0

    def accumulate(self, features: torch.Tensor | np.ndarray) -> None:
        """Add one chunk of OOD features (b, d), any float dtype."""
        H = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
        H = H.to(self.sum.device)
        if H.ndim != 2 or H.shape[1] != self.d:
            raise ValueError(f"{self.name!r}: OOD features must be (b, {self.d}), got {tuple(H.shape)}")
        if not H.is_floating_point():
            raise ValueError(f"{self.name!r}: OOD features must be floating point, got {H.dtype}")
        self.sum += H.to(ACC).sum(dim=0)
        if not bool(torch.isfinite(self.sum).all()):
            bad = (~torch.isfinite(H)).reshape(H.shape[0], -1).any(dim=1).nonzero()
            row = self.rows + (int(bad[0]) if bad.numel() else 0)
            raise ValueError(f"OOD features of {self.name!r} hold NaN or inf at row {row} (0-based)")
        self.rows += H.shape[0]

    def compute(self) -> dict[str, float]:
        """nc5 = mean_k |cos(mu_k, mu_OOD)| (uncentred, as NECO and rhubarbwu), nc5_centred = mean_k
        |cos(mu_k - mu_G, mu_OOD - mu_G)| (mu_G of the convention), nc5_max = max_k |cos(mu_k,
        mu_OOD)|; a zero vector has cosine 0 with everything."""
        if self.rows == 0:
            raise ValueError(f"{self.name!r}: no OOD samples")
        mu = self.sum / self.rows  # (d,)
        M = self.means.M  # (d, K)
        muG = self.means.global_mean(self.conv)
        cos = _abs_cos(M, mu)
        return {"nc5": float(cos.mean()), "nc5_centred": float(_abs_cos(M - muG[:, None], mu - muG).mean()),
                "nc5_max": float(cos.max()), "ood_num_samples": float(self.rows)}


def _abs_cos(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|cos(M[:, k], v)|, shape (K,); 0 where a norm is 0."""
    den = M.norm(dim=0) * v.norm()
    return ((v @ M).abs() / den.clamp_min(torch.finfo(ACC).tiny)).where(den > 0, 0.0)


def ood_metrics(means: ClassMeans, ood_chunks: Iterable, convention: Convention = Convention(),
                name: str = "ood") -> dict[str, float]:
    """NC5 of ID class means against a stream of OOD chunks.

    Args:
        means: ID class means (ClassMeanAccumulator(...).compute(), pass 1 of the ID data).
        ood_chunks: iterable of OOD feature chunks (b, d), or tuples whose first item is one
            (as dnc.io.iter_feature_chunks yields them; labels and predictions are ignored).
        convention: the global mean used by nc5_centred.

    Returns:
        {"nc5", "nc5_centred", "nc5_max", "ood_num_samples"}.
    """
    acc = OODAccumulator(means, convention, name)
    for ch in ood_chunks:
        acc.accumulate(ch[0] if isinstance(ch, tuple) else ch)
    return acc.compute()
