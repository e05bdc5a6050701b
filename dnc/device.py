"""Where tensors live and in which precision: one rule for every stage (CUDA when available unless
told otherwise; the dtype names of the settings, dnc.settings.DTYPES, mapped to torch), the GPUs a
machine shows, the determinism settings of a stage, and the device record written into every
output (dnc.io, key ``dnc:device``; docs/schemas.md).

Importing this module does not import torch: the workflow counts the machine's GPUs at parse time
(local_gpus), which must stay torch-free; the functions that need torch import it themselves.

Environment switches (docs/cluster.md): DNC_REQUIRE_GPU=1 makes device 'auto' an error where it
would fall back to the CPU; DNC_DETERMINISTIC=0 allows non-deterministic GPU kernels (and cuDNN
autotuning); DNC_TF32=1 allows TF32 in float32 matrix products and convolutions.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dnc.settings import DTYPES

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "TORCH_DTYPES", "DeviceError", "local_gpus", "gpu_signals", "claim_slot",
           "configure_determinism", "device_record", "CUBLAS_WORKSPACE"]

log = logging.getLogger(__name__)

# cuBLAS's reproducible workspace setting (CUDA >= 10.2): fixed-size buffers, so that every product
# uses the same reduction order (torch raises on a cuBLAS call under deterministic algorithms
# without it or ":16:8").
CUBLAS_WORKSPACE = ":4096:8"
_HIDDEN = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU on purpose

TORCH_DTYPES: dict[str, torch.dtype]  # declared only: module __getattr__ builds it on first use


def __getattr__(name: str) -> object:
    # TORCH_DTYPES: a settings dtype name ("float64", "float32") -> the torch dtype of that name,
    # built on first use so that importing this module does not import torch.
    if name == "TORCH_DTYPES":
        import torch

        return {dtype: getattr(torch, dtype) for dtype in DTYPES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DeviceError(RuntimeError):
    """A device that was asked for (or required by DNC_REQUIRE_GPU=1) cannot be used."""


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None or value == "" else value not in ("0", "false", "no", "off")


# --- the machine's GPUs, without torch -------------------------------------------------------------

def _physical_gpus() -> int:
    """NVIDIA GPUs the driver lists: /proc/driver/nvidia/gpus entries, else `nvidia-smi -L` lines
    (0 where neither exists: no driver)."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def local_gpus() -> int:
    """GPUs a CUDA process on this machine can see: the driver's GPUs, limited by
    CUDA_VISIBLE_DEVICES where it is set (CUDA reads its entries up to the first invalid one, such
    as -1). Torch-free: the workflow calls it at parse time and the Makefile for --resources."""
    physical = _physical_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    count = 0
    for entry in visible.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        count += 1
    return min(count, physical)


def gpu_signals() -> list[str]:
    """Why this process seems to have a GPU (empty: no sign of one, or CUDA_VISIBLE_DEVICES hides
    every GPU on purpose): CUDA_VISIBLE_DEVICES, SLURM's GPU variables, NVIDIA device files."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in _HIDDEN:
        return []
    signals = [f"{name}={os.environ[name]}" for name in
               ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")
               if os.environ.get(name)]
    signals += [f"{path} exists" for path in ("/dev/nvidia0", "/proc/driver/nvidia/gpus")
                if os.path.exists(path)]
    return signals


def claim_slot(names: list[str], lock_dir: str | os.PathLike) -> int | None:
    """Index of the first of names whose lock file in lock_dir this process could lock exclusively
    (held until the process exits), or None when every one is held by another process.

    Jobs of a local run on a machine with several GPUs (Snakemake runs at most --resources gpu=N of
    them at once) take one GPU each this way; Snakemake gives a local job no slot number."""
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        fd = os.open(Path(lock_dir) / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _HELD.append(fd)  # never closed: the lock lasts as long as this process
        return i
    return None


_HELD: list[int] = []


# --- resolving a device ----------------------------------------------------------------------------

_STATE: dict[str, object] = {"cuda": None, "warned": False}


def _cuda_device() -> torch.device:
    """The GPU of this process: the only visible one, or, with several, the first one no other dnc
    job of this user holds (claim_slot on the GPUs' UUIDs), made the current device."""
    import torch

    if _STATE["cuda"] is None:
        count = torch.cuda.device_count()
        index = 0
        if count > 1:
            names = [str(getattr(torch.cuda.get_device_properties(i), "uuid", i)) for i in range(count)]
            slot = claim_slot(names, Path(tempfile.gettempdir()) / f"dnc-gpu-locks-{os.getuid()}")
            if slot is None:
                log.warning("every one of the %d visible GPUs is held by another dnc job: sharing cuda:0",
                            count)
            index = slot or 0
            torch.cuda.set_device(index)
        _STATE["cuda"] = torch.device("cuda", index) if count > 1 else torch.device("cuda")
    return _STATE["cuda"]


def _no_gpu_message(requested: str, reasons: list[str]) -> str:
    import torch

    signals = gpu_signals()
    return (f"device {requested!r}: torch {torch.__version__} (CUDA build {torch.version.cuda}) cannot use a "
            f"GPU" + (f" ({'; '.join(reasons)})" if reasons else "")
            + (f", although {', '.join(signals)}" if signals else "")
            + ". Check the driver (nvidia-smi) against the CUDA build of torch, and the job's GPU allocation")


def _cuda_available() -> tuple[bool, list[str]]:
    """torch.cuda.is_available() and the warnings it gave (a driver too old, no driver...)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    return ok, [str(w.message).strip() for w in caught]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when torch can use one, else the CPU; 'cuda' -> that GPU;
    'cpu' or 'cuda:<i>' -> that device. Records the device for every output this process writes
    (dnc.io, ``dnc:device``).

    Where 'auto' falls back to the CPU although a GPU seems present or assigned (gpu_signals:
    CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS, /dev/nvidia0...), it logs a warning naming them, once per
    process; with DNC_REQUIRE_GPU=1 any fallback raises DeviceError instead. 'cuda' and
    'cuda:<i>' raise DeviceError at once when torch cannot use that GPU.
    """
    import torch

    dev = torch.device(device) if device != "auto" else None
    if dev is None or dev.type == "cuda":
        ok, reasons = _cuda_available()
        if dev is not None and not (ok and (dev.index or 0) < torch.cuda.device_count()):
            count = torch.cuda.device_count() if ok else 0
            raise DeviceError(_no_gpu_message(device, reasons + [f"{count} GPU(s) visible"]))
        if dev is None and not ok:
            if _flag("DNC_REQUIRE_GPU", False):
                raise DeviceError(_no_gpu_message(device, reasons) + " (DNC_REQUIRE_GPU=1)")
            if gpu_signals() and not _STATE["warned"]:
                _STATE["warned"] = True
                log.warning("falling back to the CPU: %s", _no_gpu_message(device, reasons))
            dev = torch.device("cpu")
        elif dev is None or dev.index is None:
            dev = _cuda_device()
    from dnc.io import set_device_record

    set_device_record(device_record(dev))
    return dev


def _tf32() -> dict[str, bool]:
    import torch

    flags = {"matmul": torch.backends.cuda.matmul.allow_tf32}
    try:
        flags["cudnn"] = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # conv and RNN flags set apart through torch's newer fp32_precision API
        flags["cudnn"] = torch.backends.cudnn.conv.fp32_precision == "tf32"
    return flags


def device_record(dev: torch.device) -> dict[str, object]:
    """What a result was computed on: device, GPU name, torch and CUDA versions, and the settings
    of configure_determinism in force (the value of ``dnc:device``, docs/schemas.md)."""
    import torch

    record: dict[str, object] = {"device": str(dev), "name": "cpu", "torch": torch.__version__,
                                 "cuda": torch.version.cuda,
                                 "deterministic": torch.are_deterministic_algorithms_enabled(),
                                 "tf32": _tf32()}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        record["name"] = torch.cuda.get_device_name(index)
        record["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return record


# --- determinism -----------------------------------------------------------------------------------

def configure_determinism(deterministic: bool | None = None, tf32: bool | None = None) -> dict[str, object]:
    """The reproducibility settings of a stage, called by every stage script that computes with
    torch before anything touches CUDA (docs/cluster.md, "Determinism").

    deterministic (default: env DNC_DETERMINISTIC, on): CUBLAS_WORKSPACE_CONFIG=:4096:8 where it is
    unset (read by cuBLAS when CUDA starts), torch.use_deterministic_algorithms(True) (raising on an
    op without a deterministic kernel, not warning), cuDNN deterministic and not benchmarking.
    Off: torch's defaults (non-deterministic kernels allowed, cuDNN autotuning on).
    tf32 (default: env DNC_TF32, off): TF32 in float32 matrix products and cuDNN convolutions;
    off keeps float32 at full precision on every GPU (torch enables TF32 for convolutions by
    default). Float64, the precision of the DUFM and metric stages, is never affected.

    Returns the settings in force (the fields of the device record).
    """
    import torch

    deterministic = _flag("DNC_DETERMINISTIC", True) if deterministic is None else deterministic
    tf32 = _flag("DNC_TF32", False) if tf32 is None else tf32
    if deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():  # too late for cuBLAS's handles of this process
            log.warning("CUDA started before configure_determinism: CUBLAS_WORKSPACE_CONFIG is set now "
                        "but may not hold for this process's cuBLAS handles")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    # The legacy flags on purpose: mixing them with fp32_precision makes torch's getters raise.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    settings = {"deterministic": deterministic, "tf32": _tf32(),
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    log.info("determinism settings: %s", settings)
    return settings


if __name__ == "__main__":  # `python -m dnc.device`: the GPU count for `--resources gpu=N` (Makefile)
    print(local_gpus())
