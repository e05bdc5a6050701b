"""Where tensors live: one rule for every stage (CUDA when available unless told otherwise)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else ('cpu', 'cuda:1') goes to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
