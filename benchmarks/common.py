"""Shared by the benchmark scripts: a one-line description of the machine, device sync."""

from __future__ import annotations

import os
import platform

import torch


def machine(device: torch.device | None = None) -> str:
    """CPU model, cores, torch version and threads (and the GPU when device is CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device is not None and device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
