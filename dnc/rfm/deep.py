"""Deep Recursive Feature Machine (Beaglehole et al. 2024), as recorded for collapse analysis.

Recipe (docs/rfm.md, "Deep RFM"), for layers l = 1..depth on training rows X_l (n, d_l):
  1. X_l <- rows normalised to unit length                       -> "input"
  2. fit the kernel machine on +-1 one-hot targets; M_l = AGOP / max|AGOP|
  3. S_l = M_l^{1/2}; X_l S_l                                     -> "projected"
  4. Phi(X_l S_l): ReLU(X S W^T), W (width, d_l) i.i.d. U(-1/sqrt(d_l), 1/sqrt(d_l)); or cosine
     sqrt(2/D) cos(X S W^T + b), W (D, d_l) i.i.d. Cauchy(0, gamma), b ~ U[0, 2 pi), D = d_l;
     or identity (tests, ablations)                               -> "mapped" = X_{l+1}
agop=False is the ablation M_l = I (S_l = I, no kernel fit). Held-out rows follow the same maps:
the same normalisation, S_l and W_l, with the kernel machine fitted on the training rows only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from dnc.layout import RFM_REPRESENTATIONS
from dnc.linalg import psd_sqrt
from dnc.rfm.kernels import Kernel, as_tensor, kernel_agop

__all__ = ["RFMLayer", "deep_rfm", "pm_one_hot", "normalize_rows", "REPRESENTATIONS", "FEATURE_MAPS"]

REPRESENTATIONS = RFM_REPRESENTATIONS  # input, projected, mapped: the names of dnc.layout
FEATURE_MAPS = ("relu", "cosine", "identity")


@dataclass
class RFMLayer:
    """One Deep RFM layer.

    Attributes:
        layer: 1-based index.
        dim: d_l, the input dimension of the layer; width: dimension of "mapped".
        seconds: wall time of the layer (kernel fit, AGOP, square root, maps; train and test).
        agop_max: max |entry| of the raw AGOP, the normalising constant (nan when agop=False).
        train: {"input": (n, d_l), "projected": (n, d_l), "mapped": (n, width)} tensors (the
            names asked for in ``record``).
        test: the same for X_test, or None.
        S: the (d_l, d_l) square root S_l, W: (width, d_l) weights, b: cosine phases (keep_maps).
    """

    layer: int
    dim: int
    width: int
    seconds: float
    agop_max: float
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor] | None = None
    S: torch.Tensor | None = field(default=None, repr=False)
    W: torch.Tensor | None = field(default=None, repr=False)
    b: torch.Tensor | None = field(default=None, repr=False)


def pm_one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, K) targets: +1 for the true class, -1 elsewhere."""
    Y = torch.full((labels.shape[0], num_classes), -1.0, dtype=dtype, device=labels.device)
    return Y.scatter_(1, labels.long()[:, None], 1.0)


def normalize_rows(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit Euclidean length (an all-zero row stays zero instead of becoming NaN)."""
    return X / X.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)


def _draw_map(feature_map: str, d: int, width: int, gamma: float | None,
              gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random weights drawn in float64 on the CPU generator, so a seed fixes them on every device."""
    if feature_map == "relu":
        bound = 1.0 / math.sqrt(d)
        return torch.rand(width, d, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound), None
    if feature_map == "cosine":
        W = torch.empty(d, d, dtype=torch.float64).cauchy_(0.0, gamma, generator=gen)
        return W, torch.rand(d, generator=gen, dtype=torch.float64).mul_(2 * math.pi)
    return None, None


def _apply_map(feature_map: str, P: torch.Tensor, W: torch.Tensor | None,
               b: torch.Tensor | None) -> torch.Tensor:
    if feature_map == "relu":
        return torch.relu(P @ W.mT)
    if feature_map == "cosine":
        return math.sqrt(2.0 / W.shape[0]) * torch.cos(P @ W.mT + b)
    return P


def _layer_forward(X: torch.Tensor, S: torch.Tensor | None, feature_map: str, W: torch.Tensor | None,
                   b: torch.Tensor | None) -> dict[str, torch.Tensor]:
    P = X if S is None else X @ S
    return dict(zip(REPRESENTATIONS, (X, P, _apply_map(feature_map, P, W, b))))


def deep_rfm(
    X: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    depth: int,
    width: int = 512,
    feature_map: str = "relu",
    bandwidth: float = 2.0,
    ridge: float = 1e-3,
    agop: bool = True,
    seed: int = 0,
    kernel: Kernel = "laplace",
    gamma: float | None = None,
    X_test: torch.Tensor | np.ndarray | None = None,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    record: Sequence[str] = REPRESENTATIONS,
    store_device: torch.device | str | None = "cpu",
    keep_maps: bool = False,
    check_memory: bool = True,
    progress: bool = True,
) -> list[RFMLayer]:
    """Run Deep RFM and record, per layer, the input, AGOP-projected and mapped representations.

    Args:
        X: (n, *shape) training samples (flattened to (n, d)); numpy or torch.
        labels: (n,) integer classes 0..K-1.
        depth: number of layers.
        width: output dimension of the ReLU map (512); the cosine map uses D = d_l, identity d_l.
        feature_map: "relu" (default), "cosine" (needs gamma, the Cauchy scale) or "identity".
        bandwidth, ridge, kernel: the kernel machine (Laplace, L = 2, lambda = 1e-3 by default).
        agop: False runs the ablation M_l = I (S_l = I, no kernel fit).
        seed: seeds a CPU torch.Generator for every random map (same weights on any device).
        X_test: optional (m, *shape) held-out samples mapped through the same layers.
        num_classes: K (default labels.max() + 1).
        dtype: compute dtype (float64 default; float32 allowed; the square root is always float64).
        device: compute device (default: X's device, CPU for numpy input).
        record: which of "input", "projected", "mapped" to keep.
        store_device: where recorded tensors are kept ("cpu" default, so depth x 3 representations
            do not compete with the n x n kernel for GPU memory; None keeps them on ``device``).
        keep_maps: also return S_l, W_l (and cosine phases) per layer.
        check_memory: refuse (RFMMemoryError) a layer whose kernel fit cannot fit in memory.
        progress: tqdm bar over the layers.

    Returns:
        List of ``depth`` RFMLayer records (see docs/rfm.md for shapes and disk cost).
    """
    _check_args(feature_map, gamma, record, depth)
    dev = torch.device(device) if device is not None else (
        X.device if isinstance(X, torch.Tensor) else torch.device("cpu"))
    Xl, y, Tl = _inputs(X, labels, X_test, dtype, dev)
    K = int(num_classes) if num_classes is not None else int(y.max()) + 1
    Y = pm_one_hot(y, K, dtype) if agop else None
    gen = torch.Generator().manual_seed(seed)
    keep = (lambda t: t) if store_device is None else (lambda t: t.to(store_device))

    layers: list[RFMLayer] = []
    for layer in tqdm(range(1, depth + 1), desc="Deep RFM", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        Xl = normalize_rows(Xl)
        d = Xl.shape[1]
        S, agop_max = (_agop_sqrt(Xl, Y, kernel, bandwidth, ridge, dtype, check_memory) if agop
                       else (None, float("nan")))
        W, b = _draw_map(feature_map, d, width, gamma, gen)
        W = None if W is None else W.to(device=dev, dtype=dtype)
        b = None if b is None else b.to(device=dev, dtype=dtype)
        out = _layer_forward(Xl, S, feature_map, W, b)
        test = None
        if Tl is not None:
            test = _layer_forward(normalize_rows(Tl), S, feature_map, W, b)
            Tl = test["mapped"]
        Xl = out["mapped"]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        layers.append(RFMLayer(
            layer=layer, dim=d, width=Xl.shape[1], seconds=time.perf_counter() - t0, agop_max=agop_max,
            train={k: keep(out[k]) for k in record},
            test=None if test is None else {k: keep(test[k]) for k in record},
            S=None if not keep_maps or S is None else keep(S),
            W=None if not keep_maps or W is None else keep(W),
            b=None if not keep_maps or b is None else keep(b)))
    return layers


def _agop_sqrt(X: torch.Tensor, Y: torch.Tensor, kernel: Kernel, bandwidth: float, ridge: float,
               dtype: torch.dtype, check_memory: bool) -> tuple[torch.Tensor, float]:
    """(S, max |AGOP|): S (d, d) the square root of the kernel machine's AGOP scaled to max |entry| 1."""
    G = kernel_agop(X, Y, kernel, bandwidth, ridge, dtype=dtype, check_memory=check_memory)
    agop_max = float(G.abs().max())
    return psd_sqrt(G / agop_max).to(dtype), agop_max


def _check_args(feature_map: str, gamma: float | None, record: Sequence[str], depth: int) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if feature_map == "cosine" and (gamma is None or not gamma > 0):
        raise ValueError("feature_map='cosine' needs gamma > 0 (the Cauchy scale of W)")
    unknown = set(record) - set(REPRESENTATIONS)
    if unknown:
        raise ValueError(f"record: unknown names {sorted(unknown)}; choose from {REPRESENTATIONS}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")


def _inputs(X, labels, X_test, dtype: torch.dtype,
            dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """X (n, d), labels (n,) int64 and X_test (m, d) or None on dev, samples flattened to rows."""
    Xl = as_tensor(X, dtype, dev)
    Xl = Xl.reshape(Xl.shape[0], -1)
    y = as_tensor(labels, torch.int64, dev).reshape(-1)
    if y.shape[0] != Xl.shape[0]:
        raise ValueError(f"X has {Xl.shape[0]} rows but labels has {y.shape[0]}")
    if X_test is None:
        return Xl, y, None
    Tl = as_tensor(X_test, dtype, dev)
    Tl = Tl.reshape(Tl.shape[0], -1)
    if Tl.shape[1] != Xl.shape[1]:
        raise ValueError(f"X_test has {Tl.shape[1]} features per sample, X has {Xl.shape[1]}")
    return Xl, y, Tl
