"""Peak-memory estimate and guard for one kernel fit + AGOP (docs/rfm.md, "Memory").

The estimate mirrors what :mod:`dnc.rfm.kernels` allocates: the n x n kernel, factorised in place
(the Cholesky factor overwrites the kernel), then the AGOP pass over row blocks of b rows whose
temporaries are at most two b x n blocks and a b x n boolean mask; plus O(n d + n K + d^2) vectors.
The guard runs before anything of size n x n is allocated, so a run that cannot fit fails at once
with a message instead of swapping or being killed by the OOM killer half-way through.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = [
    "RFMMemoryError",
    "format_bytes",
    "row_block",
    "estimate_peak_bytes",
    "available_bytes",
    "check_memory",
    "max_samples",
]

# Relative slack for allocator fragmentation, LAPACK/cuSOLVER workspaces and small tensors.
_SLACK = 1.05


def format_bytes(n: int) -> str:
    """'512.0 MiB' below 1 GiB, else '3.25 GiB'."""
    return f"{n / 2**20:.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


class RFMMemoryError(MemoryError):
    """A kernel fit + AGOP, or a whole Deep RFM run, would not fit in the memory of its device.

    Attributes: n (samples), required and available (bytes), device (str), and in the message
    what dominates the estimate, the layer that sets the peak and what limited the memory.
    """

    def __init__(self, n: int, required: int, available: int, device: str, what: str = "kernel fit + AGOP",
                 dominant: str = "dominated by the n x n kernel", layer: int | None = None,
                 limit: str | None = None):
        self.n, self.required, self.available, self.device = n, required, available, device
        at = "" if layer is None else f" at layer {layer}"
        have = f"{format_bytes(available)} is available" + ("" if limit is None else f" ({limit})")
        super().__init__(
            f"{what} with n = {n} samples needs about {format_bytes(required)} on {device}{at} "
            f"(estimate, {dominant}) but only {have}; "
            f"use fewer samples, float32, or a device with more memory (see docs/rfm.md, 'Memory')")


def row_block(n: int) -> int:
    """Rows per AGOP block: all rows up to 1024, else ceil(n / 4).

    Two b x n blocks then never exceed half the n x n kernel that the fit already needed, so the
    AGOP pass does not raise the peak, while the blocks stay large enough for efficient GEMMs.
    """
    return n if n <= 1024 else math.ceil(n / 4)


def estimate_peak_bytes(n: int, d: int, K: int, dtype: torch.dtype = torch.float64,
                        device: str | torch.device = "cpu", general_M: bool = False) -> int:
    """Estimated peak bytes of ``kernel_agop`` on (n, d) data with K outputs.

    Args:
        n, d, K: samples, features, outputs.
        dtype: compute dtype (float64 default).
        device: "cpu" or a CUDA device; the same count is used for both (the in-place Cholesky is
            device-independent code in torch), only the available memory differs.
        general_M: a non-identity Mahalanobis matrix M adds the n x d product X M.

    Returns:
        Bytes (int), including a 5% slack.
    """
    it = torch.empty((), dtype=dtype).element_size()
    b = row_block(n)
    fit = n * n * it + n * K * it  # kernel (factorised in place) + right-hand sides
    agop = 2 * b * n * it + b * n  # distance/kernel blocks + boolean near-zero mask
    vectors = it * ((4 + general_M) * n * d + 3 * n * K + 3 * d * d + 2 * b * d + 2 * n)
    return int(_SLACK * (max(fit, agop) + vectors))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # optional; not a dependency

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _cgroup_available() -> int | None:
    """Room left under a container's memory limit (cgroup v2, then v1), if one is set."""
    pairs = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]
    for limit_path, usage_path in pairs:
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge v1 value means no limit
            return max(int(limit) - usage, 0)
    return None


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory that a new allocation on ``device`` can use now, in bytes.

    CPU: MemAvailable of /proc/meminfo (psutil as fallback), capped by a cgroup limit if any.
    CUDA: free memory from torch.cuda.mem_get_info plus what torch's caching allocator holds
    unused (it is reused before new memory is requested).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not values:  # unknown platform: do not block the run
        return 2**62
    return min(values)


def check_memory(n: int, d: int, K: int, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu", general_M: bool = False) -> int:
    """Raise :class:`RFMMemoryError` if a kernel fit + AGOP of this size cannot fit on ``device``.

    Set the environment variable ``DNC_RFM_NO_MEMCHECK=1`` to skip the check (e.g. when swap or
    unified memory is intended). Returns the estimate in bytes.
    """
    need = estimate_peak_bytes(n, d, K, dtype, device, general_M)
    if os.environ.get("DNC_RFM_NO_MEMCHECK") == "1":
        return need
    have = available_bytes(device)
    if need > have:
        raise RFMMemoryError(n, need, have, str(torch.device(device)))
    return need


def max_samples(d: int, K: int, budget_bytes: int, dtype: torch.dtype = torch.float64) -> int:
    """Largest n whose :func:`estimate_peak_bytes` fits in ``budget_bytes`` (bisection)."""
    lo, hi = 0, 1
    while estimate_peak_bytes(hi, d, K, dtype) <= budget_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_peak_bytes(mid, d, K, dtype) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo
