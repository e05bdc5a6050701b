"""Where the training loop finds its rows: on the device for the whole run when they fit, otherwise
in host memory, gathered batch by batch into pinned memory and copied without blocking.

Why: a batch gathered on the CPU and copied with a blocking ``.to(device)`` at every step makes the
CPU wait for the GPU at every step, so the two never overlap. With the rows resident on the device,
a step's gather is an ``index_select`` on the device and the step reads nothing back; when they do
not fit, the copies are asynchronous (from pinned memory on CUDA) and still need no host read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["DEVICE_SHARE", "Rows", "place_splits", "fits_on_device", "epoch_permutation"]

# The data may take at most this share of the device's free memory; the rest is left to the model,
# its activations and the optimiser, which are not known here.
DEVICE_SHARE = 0.5


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether nbytes of data fit in DEVICE_SHARE of the free memory of a CUDA device (always True
    elsewhere: on the CPU the rows are in host memory anyway)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


def _pinned(device: torch.device) -> bool:
    # Page-locked host memory only means something (and only exists) with CUDA.
    return device.type == "cuda"


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


@dataclass
class Rows:
    """One split's rows for the training loop and evaluation.

    X: (N, *shape) inputs, y: (N,) int64 labels, T: (N, K) float32 targets of the MSE losses (None
    for ce). resident: the three live on `device`; otherwise they live in host memory and every
    batch is copied to `device` without blocking.
    """

    X: torch.Tensor
    y: torch.Tensor
    T: torch.Tensor | None
    device: torch.device
    resident: bool

    def __len__(self) -> int:
        return len(self.y)

    @property
    def index_device(self) -> torch.device:
        """Where batch indices must live: with the rows, so that a gather never crosses devices."""
        return self.X.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(X, y, T) of the rows idx (B,) (on index_device), on `device`."""
        out = []
        for t in (self.X, self.y, self.T):
            if t is None:
                out.append(None)
            elif self.resident:
                out.append(t.index_select(0, idx))
            else:  # gathered straight into pinned memory, so the copy is truly asynchronous
                buf = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=_pinned(self.device))
                out.append(_to_device(torch.index_select(t, 0, idx, out=buf), self.device))
        return out[0], out[1], out[2]

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(X, y, T) of the contiguous rows start:stop, on `device`."""
        parts = [None if t is None else t[start:stop] for t in (self.X, self.y, self.T)]
        if not self.resident:
            parts = [None if t is None else _to_device(t, self.device) for t in parts]
        return parts[0], parts[1], parts[2]


def place_splits(data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 targets: Callable[[torch.Tensor], torch.Tensor | None], device: torch.device,
                 resident: bool | None = None) -> dict[str, Rows]:
    """Every split of data ({split: (X (N, *shape), y (N,))}) placed once for the run.

    targets(y) gives the (N, K) targets of a split (or None), computed once here instead of at every
    step. resident: None decides by fits_on_device over all splits together (inputs, labels and
    targets); True or False forces it (tests, benchmarks).
    """
    host = {s: (X, y, targets(y)) for s, (X, y) in data.items()}
    if resident is None:
        nbytes = sum(t.numel() * t.element_size() for ts in host.values() for t in ts if t is not None)
        resident = fits_on_device(nbytes, device)
    out = {}
    for split, ts in host.items():
        if resident:
            ts = tuple(None if t is None else t.to(device) for t in ts)
        out[split] = Rows(*ts, device=device, resident=resident)
    return out


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The order (n,) int64 of the rows in an epoch, on device (the rows' index_device).

    Drawn on the CPU from a generator seeded by (seed, epoch), so that every device and a resumed
    run see the same batches, then copied once per epoch without blocking.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if device.type == "cpu":
        return perm
    return _to_device(perm.pin_memory() if _pinned(device) else perm, device)
