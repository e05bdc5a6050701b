"""Pass 1 of the streaming collapse metrics (per-class counts and float64 sums) and the chunk
handling both passes share: input checks, cache-sized row blocks and a reused float64 work buffer.

Pass 2 and the drivers that run both passes live in accumulators.py; the formulas in formulas.py.
"""

from __future__ import annotations

import numpy as np
import torch

from dnc.metrics.formulas import ACC, ClassMeans, unit_roundoff

__all__ = ["ClassMeanAccumulator", "check_finite", "check_chunk", "to_tensor", "row_blocks", "WorkBuffer",
           "BLOCK_ELEMENTS"]


def to_tensor(x: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """x as a tensor (numpy arrays shared, not copied), moved to device when given."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if device is None else t.to(device)


def check_finite(x: torch.Tensor, name: str, row_offset: int = 0) -> None:
    """Raise ValueError naming the layer and the first row holding NaN or inf."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(x.shape[0], -1).any(dim=1).nonzero()
        row = int(rows[0]) + row_offset
        raise ValueError(f"features of {name!r} hold NaN or inf at row {row} (0-based)")


BLOCK_ELEMENTS = 1 << 18  # float64 work blocks of 2 MiB stay in cache on CPU (measured: 8 MiB is 25% slower)


def row_blocks(H: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges of cache-sized blocks on CPU (about 5x faster than whole-chunk ops, which are
    memory-bound at d in the thousands); one block on CUDA, where large kernels win."""
    b = H.shape[0]
    step = b if H.is_cuda else max(1, BLOCK_ELEMENTS // max(1, H.shape[1]))
    return [(i, min(i + step, b)) for i in range(0, b, step)]


class WorkBuffer:
    """One float64 block buffer reused for every block and chunk.

    A fresh multi-megabyte tensor per block costs page faults on every allocation (the allocator
    hands large blocks back to the system): at d = 4096 that tripled the time of pass 2.
    """

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def get(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, d) float64 view on like's device; contents undefined."""
        d = like.shape[1]
        b = self.buf
        if b is None or b.shape[1] != d or b.shape[0] < rows or b.device != like.device:
            self.buf = b = torch.empty(rows, d, dtype=ACC, device=like.device)
        return b[:rows]


def check_chunk(H: torch.Tensor, y: torch.Tensor, K: int, d: int, name: str) -> None:
    """Raise ValueError unless H is (b, d) floating point and y (b,) labels in [0, K)."""
    if H.ndim != 2 or H.shape[1] != d:
        raise ValueError(f"{name!r}: features must be (b, {d}), got {tuple(H.shape)}")
    if y.shape != (H.shape[0],):
        raise ValueError(f"{name!r}: labels must be ({H.shape[0]},), got {tuple(y.shape)}")
    if not H.is_floating_point():
        raise ValueError(f"{name!r}: features must be floating point, got {H.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"{name!r}: labels must lie in [0, {K}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


class ClassMeanAccumulator:
    """Pass 1: per-class counts and float64 sums.

    accumulate(features (b, d), labels (b,)) any number of times, then compute() -> ClassMeans,
    which also records the unit roundoff of the coarsest feature dtype seen (float32 chunks of a
    feature file: 2^-24), the precision the rank cutoff of Sigma_B^+ follows.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu",
                 name: str = "layer") -> None:
        self.K, self.d, self.name = num_classes, dim, name
        self.device = torch.device(device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(num_classes, dim, dtype=ACC, device=self.device)
        self.rows = 0
        self.unit_roundoff = unit_roundoff(ACC)
        self._work = WorkBuffer()

    def accumulate(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add one chunk: features (b, d) of any float dtype, labels (b,) in [0, num_classes)."""
        H = to_tensor(features, self.device)
        y = to_tensor(labels, self.device).long()
        check_chunk(H, y, self.K, self.d, self.name)
        self.unit_roundoff = max(self.unit_roundoff, unit_roundoff(H.dtype))
        self.counts += torch.bincount(y, minlength=self.K)
        for i, j in row_blocks(H):
            X = self._work.get(j - i, H)
            X.copy_(H[i:j])  # float64 copy of the block
            self.sums.index_add_(0, y[i:j], X)  # (K, d) += one-hot^T H, float64
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
        classes = present.nonzero().flatten()
        counts = self.counts[classes]
        # One new K x d tensor (no boolean-mask copy when every class is present), kept row-major:
        # M is its (d, K) transpose, a view, so pass 2's per-row gathers read M^T without a second
        # copy of the means (at vocabulary-sized K each copy is K x d float64).
        rows = self.sums.clone() if classes.numel() == self.K else self.sums.index_select(0, classes)
        rows.div_(counts[:, None].to(ACC))
        return ClassMeans(
            classes=classes,
            counts=counts,
            M=rows.T,  # (d, K), a view of (K, d) row-major means
            num_labels=self.K,
            unit_roundoff=self.unit_roundoff,
        )
