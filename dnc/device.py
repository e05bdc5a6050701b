"""Where tensors live and in which precision: one rule for every stage (CUDA when available unless
told otherwise; the dtype names of the settings, dnc.settings.DTYPES, mapped to torch)."""

from __future__ import annotations

import torch

from dnc.settings import DTYPES

__all__ = ["resolve_device", "TORCH_DTYPES"]

# A settings dtype name ("float64", "float32") -> the torch dtype of that name.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else ('cpu', 'cuda:1') goes to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
