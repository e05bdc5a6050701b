"""Deep Recursive Feature Machines: kernel AGOP and Deep RFM (see docs/rfm.md).

    from dnc.rfm import kernel_agop, deep_rfm
    G = kernel_agop(X, Y)                     # (d, d) float64 AGOP of a Laplace kernel machine
    layers = deep_rfm(X, y, depth=12)         # per layer: .train["input" | "projected" | "mapped"]
    deep_rfm(X, y, depth=12, record=(), on_layer=f)   # f(layer) sees each layer on the device; nothing kept
"""

from dnc.linalg import psd_sqrt
from dnc.rfm.deep import FEATURE_MAPS, REPRESENTATIONS, RFMLayer, deep_rfm, normalize_rows, pm_one_hot
from dnc.rfm.kernels import (
    Kernel,
    agop_from_alpha,
    as_tensor,
    fit_kernel_machine,
    kernel_agop,
    kernel_matrix,
    kernel_predict,
)
from dnc.rfm.memory import (
    RFMMemoryError,
    available_bytes,
    check_memory,
    estimate_peak_bytes,
    format_bytes,
    max_samples,
    row_block,
)
from dnc.rfm.plan import RFMMemoryPlan, check_plan, plan_deep_rfm

__all__ = [
    "FEATURE_MAPS",
    "REPRESENTATIONS",
    "Kernel",
    "RFMLayer",
    "RFMMemoryError",
    "RFMMemoryPlan",
    "agop_from_alpha",
    "as_tensor",
    "available_bytes",
    "check_memory",
    "check_plan",
    "deep_rfm",
    "estimate_peak_bytes",
    "fit_kernel_machine",
    "format_bytes",
    "kernel_agop",
    "kernel_matrix",
    "kernel_predict",
    "max_samples",
    "normalize_rows",
    "plan_deep_rfm",
    "pm_one_hot",
    "psd_sqrt",
    "row_block",
]
