"""Small linear-algebra helpers shared by the kernel (dnc.rfm) and network (dnc.agop) AGOP code."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["psd_sqrt"]


def psd_sqrt(M: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (d, d): float64 eigh, negative eigenvalues clamped to 0.

    Returns a float64 (d, d) tensor on M's device. M is symmetrised first, so rounding asymmetry
    cannot produce complex or non-symmetric output; round-off negative eigenvalues become 0.
    """
    M = torch.as_tensor(M).to(torch.float64)
    evals, evecs = torch.linalg.eigh((M + M.mT) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.mT
