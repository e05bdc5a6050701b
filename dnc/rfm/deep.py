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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from dnc.layout import RFM_REPRESENTATIONS
from dnc.linalg import psd_sqrt
from dnc.rfm.kernels import Kernel, as_tensor, kernel_agop
from dnc.rfm.plan import check_plan, plan_deep_rfm

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


@dataclass(frozen=True)
class _Recipe:
    """The fixed settings of every layer (deep_rfm's arguments)."""

    feature_map: str
    width: int
    gamma: float | None
    kernel: Kernel
    bandwidth: float
    ridge: float
    agop: bool
    dtype: torch.dtype
    device: torch.device
    check_memory: bool


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
    on_layer: Callable[[RFMLayer], None] | None = None,
    callback_bytes: Callable[[int, int], int] | None = None,
    host_limit: int | None = None,
    host_after_bytes: int = 0,
) -> list[RFMLayer]:
    """Run Deep RFM layer by layer, handing each layer to ``on_layer`` and keeping what ``record`` asks.

    Only the next layer's input (the mapped rows) stays on the compute device from one layer to
    the next; the input and projected representations are released once ``on_layer`` returns.

    Args:
        X: (n, *shape) training samples (flattened to (n, d)); numpy or torch, any device.
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
        record: which of "input", "projected", "mapped" the returned layers keep (() keeps none).
        store_device: where kept tensors go ("cpu" default, so depth x 3 representations do not
            compete with the n x n kernel for GPU memory; None keeps them on ``device``).
        keep_maps: also return S_l, W_l (and cosine phases) per layer.
        check_memory: before layer 1, refuse (RFMMemoryError) a run whose whole-run estimate
            (dnc.rfm.plan.plan_deep_rfm) does not fit the device or host RAM; and before every
            kernel fit, one that does not fit the memory free at that moment.
        progress: tqdm bar over the layers.
        on_layer: called once per layer with an RFMLayer holding all three representations of
            the train (and test) rows, and S, W, b, on the compute device; they are released when
            it returns unless it keeps references (measure, write or take Gram matrices there).
        callback_bytes: scratch (bytes) that on_layer allocates on the compute device for one
            (rows, dim) representation, counted by the memory check.
        host_limit: bytes this process may hold in all (the job's mem_mb); None: no limit but the
            host RAM available.
        host_after_bytes: host bytes the caller adds after the run next to the kept
            representations (e.g. writing them), counted by the memory check.

    Returns:
        List of ``depth`` RFMLayer records holding the ``record`` representations on store_device
        (see docs/rfm.md for shapes and disk cost).
    """
    _check_args(feature_map, gamma, record, depth)
    dev = torch.device(device) if device is not None else (
        X.device if isinstance(X, torch.Tensor) else torch.device("cpu"))
    K = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if check_memory:
        plan = plan_deep_rfm(len(X), 0 if X_test is None else len(X_test), math.prod(X.shape[1:]), K,
                             depth, width, feature_map, agop, dtype, dev, record, store_device,
                             keep_maps, callback_bytes, host_after_bytes)
        check_plan(plan, f"Deep RFM ({depth} layers, {feature_map}, agop={agop})", len(X), host_limit)
    recipe = _Recipe(feature_map, width, gamma, kernel, bandwidth, ridge, agop, dtype, dev, check_memory)
    Xl, y, Tl = _inputs(X, labels, X_test, dtype, dev)
    Y = pm_one_hot(y, K, dtype) if agop else None
    del y
    gen = torch.Generator().manual_seed(seed)
    layers: list[RFMLayer] = []
    for layer in tqdm(range(1, depth + 1), desc="Deep RFM", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        # Rebinding releases the previous layer's mapped rows (unless kept or held by the caller)
        # before the kernel fit, the peak of the layer.
        Xl = normalize_rows(Xl)
        Tl = None if Tl is None else normalize_rows(Tl)
        rec = _layer(layer, Xl, Tl, Y, gen, recipe, t0)
        Xl = rec.train["mapped"]
        Tl = None if rec.test is None else rec.test["mapped"]
        if on_layer is not None:
            on_layer(rec)
        layers.append(_stored(rec, record, store_device, keep_maps))
        del rec  # input and projected of this layer go before the next kernel fit
    return layers


def _layer(layer: int, X: torch.Tensor, T: torch.Tensor | None, Y: torch.Tensor | None,
           gen: torch.Generator, r: _Recipe, t0: float) -> RFMLayer:
    """One layer on unit rows X (n, d_l) and T (m, d_l) or None: the three representations on
    r.device; seconds counts from t0 (the normalisation's start)."""
    d = X.shape[1]
    S, agop_max = (_agop_sqrt(X, Y, r.kernel, r.bandwidth, r.ridge, r.dtype, r.check_memory) if r.agop
                   else (None, float("nan")))
    W, b = _draw_map(r.feature_map, d, r.width, r.gamma, gen)
    W = None if W is None else W.to(device=r.device, dtype=r.dtype)
    b = None if b is None else b.to(device=r.device, dtype=r.dtype)
    train = _layer_forward(X, S, r.feature_map, W, b)
    test = None if T is None else _layer_forward(T, S, r.feature_map, W, b)
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)
    return RFMLayer(layer=layer, dim=d, width=train["mapped"].shape[1], seconds=time.perf_counter() - t0,
                    agop_max=agop_max, train=train, test=test, S=S, W=W, b=b)


def _stored(rec: RFMLayer, record: Sequence[str], store_device: torch.device | str | None,
            keep_maps: bool) -> RFMLayer:
    """The record as returned: the ``record`` representations (and maps) on store_device; a
    tensor that two names share (projected is input with M = I) is copied once."""
    copies: dict[int, torch.Tensor] = {}

    def keep(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or store_device is None:
            return t
        if id(t) not in copies:
            copies[id(t)] = t.to(store_device)
        return copies[id(t)]

    return RFMLayer(
        layer=rec.layer, dim=rec.dim, width=rec.width, seconds=rec.seconds, agop_max=rec.agop_max,
        train={k: keep(rec.train[k]) for k in record},
        test=None if rec.test is None else {k: keep(rec.test[k]) for k in record},
        S=keep(rec.S) if keep_maps else None, W=keep(rec.W) if keep_maps else None,
        b=keep(rec.b) if keep_maps else None)


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
