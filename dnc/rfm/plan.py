"""Whole-run memory plan of Deep RFM and its guard before layer 1 (docs/rfm.md, "Memory").

:func:`plan_deep_rfm` mirrors what :func:`dnc.rfm.deep.deep_rfm` holds layer by layer: the
representations it keeps (``record`` on ``store_device``) and, per layer, the largest of four
phases on the compute device: the row normalisation, the kernel fit + AGOP
(:func:`dnc.rfm.memory.estimate_peak_bytes`), the maps (input, projected, mapped of train and test
rows, map temporaries, S and W) and the ``on_layer`` callback (the three representations plus its
own scratch). On a CUDA run the device peak is checked against the GPU and the host part (what is
kept on the host, plus the CUDA libraries) against host RAM; on a CPU run both are host RAM.
:func:`check_plan` compares them with what is free now, and with the job's own limit (Snakemake's
``mem_mb``) less what the process already holds, before anything of size n x n exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dnc.layout import RFM_REPRESENTATIONS
from dnc.rfm.memory import RFMMemoryError, available_bytes, estimate_peak_bytes, format_bytes

__all__ = ["RFMMemoryPlan", "plan_deep_rfm", "check_plan", "process_rss", "layer_dims",
           "CUDA_HOST_BYTES"]

# Host memory the CUDA runtime, cuBLAS and cuSOLVER add once loaded and initialised: an allowance
# (not measured yet on a GPU of this project; docs/rfm.md), counted in the host part of CUDA runs.
CUDA_HOST_BYTES = 2 * 2**30
_F64 = 8  # float64 bytes: the square root and the metrics accumulate in float64
# glibc serves blocks under its dynamic mmap threshold (at most 32 MiB) from the heap, where freed
# blocks stay resident: measured 63 MB above the live tensors at n = 4000 (16 MB blocks). CPU runs
# count HEAP_BLOCKS of their largest representation block under that size.
HEAP_THRESHOLD, HEAP_BLOCKS = 32 * 2**20, 4


@dataclass(frozen=True)
class RFMMemoryPlan:
    """Peak memory a Deep RFM run will add to its process, by part.

    Attributes:
        device: the compute device ("cpu", "cuda:0", ...).
        host: part name -> bytes of host RAM at the host peak (for a CPU run this is the whole run).
        device_parts: part name -> bytes on the compute device at its peak (empty for a CPU run).
        peak_layer: the layer whose working set sets the compute-device peak.
    """

    device: str
    host: dict[str, int]
    device_parts: dict[str, int] = field(default_factory=dict)
    peak_layer: int = 1

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def device_bytes(self) -> int:
        return sum(self.device_parts.values())


def layer_dims(d: int, depth: int, width: int, feature_map: str) -> list[tuple[int, int]]:
    """(d_l, width of mapped) for l = 1..depth: ReLU maps to ``width`` columns, cosine and
    identity keep d_l."""
    dims = []
    for _ in range(depth):
        w = width if feature_map == "relu" else d
        dims.append((d, w))
        d = w
    return dims


def _distinct(rows: int, d: int, w: int, agop: bool, feature_map: str, s: int) -> int:
    """Bytes of the distinct tensors input, projected, mapped of ``rows`` rows (M = I makes
    projected the input itself, the identity map makes mapped the projected)."""
    return rows * s * (d + d * agop + w * (feature_map != "identity"))


def _kept(rows: int, d: int, w: int, record: Sequence[str], agop: bool, feature_map: str, s: int) -> int:
    """Bytes of the distinct tensors among the recorded names (deep_rfm keeps an alias once: with
    M = I projected is the input, with the identity map mapped is the projected)."""
    key = {"input": "X", "projected": "P" if agop else "X"}
    key["mapped"] = "M" if feature_map != "identity" else key["projected"]
    dims = {"X": d, "P": d, "M": w}
    return rows * s * sum(dims[k] for k in {key[name] for name in record})


def _layer_phases(n: int, m: int, d: int, w: int, K: int, agop: bool, feature_map: str, dtype: torch.dtype,
                  callback_bytes: Callable[[int, int], int] | None) -> list[dict[str, int]]:
    """The parts of each phase of one layer on the compute device (kept representations aside)."""
    s = torch.empty((), dtype=dtype).element_size()
    mapped_tmp = 0 if feature_map == "identity" else max(n, m) * w * s  # matmul output before relu/cos
    maps = (d * d * s + 6 * d * d * _F64) * agop + (w * d + w) * s * (feature_map != "identity")
    reps = _distinct(n, d, w, agop, feature_map, s) + _distinct(m, d, w, agop, feature_map, s)
    phases = [{"row normalisation (raw and unit rows)": (n + m + max(n, m)) * d * s},
              {"representations of the layer": reps, "map temporaries, S and W": mapped_tmp + maps}]
    if agop:
        phases.append({"kernel fit + AGOP (n x n kernel)": estimate_peak_bytes(n, d, K, dtype),
                       "normalised test rows": m * d * s})
    if callback_bytes is not None:
        scratch = max(callback_bytes(rows, dim) for rows in (n, m) for dim in (d, w) if rows)
        phases.append({"representations of the layer": reps, "on_layer scratch (measurement)": scratch})
    return phases


def plan_deep_rfm(n: int, m: int, d: int, K: int, depth: int, width: int = 512, feature_map: str = "relu",
                  agop: bool = True, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                  record: Sequence[str] = RFM_REPRESENTATIONS,
                  store_device: str | torch.device | None = "cpu", keep_maps: bool = False,
                  callback_bytes: Callable[[int, int], int] | None = None,
                  host_after_bytes: int = 0) -> RFMMemoryPlan:
    """Peak memory of ``deep_rfm`` on n training rows and m test rows of d features, K classes.

    The arguments are deep_rfm's; callback_bytes(rows, dim) is the scratch its on_layer callback
    allocates on the compute device for one (rows, dim) representation (e.g.
    dnc.rfm.stage.metrics_scratch_bytes), None for no callback; host_after_bytes what the caller
    adds on the host after the run, next to the kept representations (e.g. a feature file writer).

    Returns:
        An RFMMemoryPlan: on CUDA, the device peak by part (at the layer that sets it) and the host
        part (representations kept on the host, CUDA libraries); on the CPU, one host peak.
    """
    dev = torch.device(device)
    store = dev if store_device is None else torch.device(store_device)
    s = torch.empty((), dtype=dtype).element_size()
    same = store.type == dev.type  # kept tensors are the computed ones: no second copy
    kept_before, best, best_layer, kept_total = 0, {}, 1, 0
    base = {"targets and labels": n * (K * s + 8)}
    for layer, (dl, w) in enumerate(layer_dims(d, depth, width, feature_map), start=1):
        for phase in _layer_phases(n, m, dl, w, K, agop, feature_map, dtype, callback_bytes):
            parts = {**base, **phase}
            if same and kept_before:
                parts[f"representations kept from layers 1-{layer - 1}"] = kept_before
            if sum(parts.values()) > sum(best.values()):
                best, best_layer = parts, layer
        kept = _kept(n + m, dl, w, record, agop, feature_map, s)
        if keep_maps:  # S (d_l, d_l) with the AGOP, W (w, d_l) but for identity, cosine phases (w,)
            kept += s * (dl * dl * agop + w * dl * (feature_map != "identity")
                         + w * (feature_map == "cosine"))
        kept_before += kept if same else 0
        kept_total += kept
    kept_name = f"representations kept ({depth} layers)"
    after = {**base, kept_name: kept_total, "after the run (host_after_bytes)": host_after_bytes}
    if dev.type == "cpu":
        if sum(after.values()) > sum(best.values()):
            best, best_layer = after, depth
        block = max(n, m) * max(max(dims) for dims in layer_dims(d, depth, width, feature_map)) * s
        blocks = [b for b in (block, max(n, m) * d * s) if b < HEAP_THRESHOLD]
        heap = {"allocator (freed heap blocks kept resident)": HEAP_BLOCKS * max(blocks, default=0)}
        return RFMMemoryPlan(str(dev), _nonzero({**best, **heap}), {}, best_layer)
    host = {"CUDA runtime and libraries (allowance)": CUDA_HOST_BYTES,
            kept_name: 0 if same else kept_total, "after the run (host_after_bytes)": host_after_bytes}
    return RFMMemoryPlan(str(dev), _nonzero(host), _nonzero(best), best_layer)


def _nonzero(parts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in parts.items() if v}


def process_rss() -> int:
    """Resident set of this process now, in bytes (VmRSS; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _dominant(parts: Mapping[str, int]) -> str:
    name = max(parts, key=parts.get)
    return f"largest part: {name}, {format_bytes(parts[name])}"


def check_plan(plan: RFMMemoryPlan, what: str, n: int, host_limit: int | None = None) -> None:
    """Raise RFMMemoryError unless the plan fits: the device peak in the device's free memory, and
    the host part in min(available host RAM, host_limit - this process's resident set).

    host_limit: the job's memory limit in bytes (Snakemake's mem_mb), None when there is none.
    ``DNC_RFM_NO_MEMCHECK=1`` skips the check, as for a single kernel fit.
    """
    if os.environ.get("DNC_RFM_NO_MEMCHECK") == "1":
        return
    if plan.device_parts:  # queried first: it loads the CUDA context, which the RSS then includes
        have = available_bytes(plan.device)
        if plan.device_bytes > have:
            raise RFMMemoryError(n, plan.device_bytes, have, plan.device, what,
                                 _dominant(plan.device_parts), layer=plan.peak_layer)
    have = available_bytes("cpu")
    note = "host RAM available now"
    if host_limit is not None:
        rss = process_rss()
        if host_limit - rss < have:
            have = max(host_limit - rss, 0)
            note = (f"the job's limit {format_bytes(host_limit)} (mem_mb) less the "
                    f"{format_bytes(rss)} this process holds")
    if plan.host_bytes > have:
        raise RFMMemoryError(n, plan.host_bytes, have, "host (cpu)", what, _dominant(plan.host),
                             layer=plan.peak_layer if not plan.device_parts else None, limit=note)
