"""dnc.device: the GPUs a machine shows (torch-free), the GPU claim of a local job, the warning and
error when device 'auto' falls back to the CPU, the device record of every output, and the
determinism settings every stage script applies (docs/cluster.md, "GPUs" and "Determinism")."""

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dnc.io
from dnc import device
from dnc.device import DeviceError, claim_slot, configure_determinism, local_gpus, resolve_device
from dnc.io import DEVICE_KEY, read_metadata, set_device_record, write_parquet

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a usable GPU")


@pytest.fixture
def torch_flags():
    """Restore torch's process-wide determinism and TF32 flags after a test that sets them."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:]


@pytest.fixture
def clean_env(monkeypatch):
    """No GPU hint in the environment, no device switch; the device record restored afterwards."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE",
                 "DNC_REQUIRE_GPU", "DNC_DETERMINISTIC", "DNC_TF32", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown also removes what a test sets
        monkeypatch.delenv(name)
    monkeypatch.setattr(dnc.io, "_DEVICE_RECORD", dnc.io.current_device_record())
    monkeypatch.setitem(device._STATE, "warned", False)
    return monkeypatch


def test_determinism_on_sets_every_documented_flag(torch_flags, clean_env):
    settings = configure_determinism()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an error, not a warning
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert settings == {"deterministic": True, "tf32": {"matmul": False, "cudnn": False},
                        "cublas_workspace_config": ":4096:8"}


def test_determinism_switches_come_from_the_environment(torch_flags, clean_env):
    clean_env.setenv("DNC_DETERMINISTIC", "0")
    clean_env.setenv("DNC_TF32", "1")
    clean_env.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    settings = configure_determinism()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert settings["cublas_workspace_config"] == ":16:8"  # a value set by the user is kept
    configure_determinism(deterministic=True, tf32=False)  # explicit arguments win over the environment
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.allow_tf32


def _rule_scripts() -> dict[str, bool]:
    """Script of every rule -> whether the rule passes a compute device (params device=...)."""
    scripts: dict[str, bool] = {}
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=\S)", smk.read_text()):
            script = re.search(r'"\.\./\.\./scripts/(\w+\.py)"', block)
            if script:
                scripts[script.group(1)] = scripts.get(script.group(1), False) or "device=" in block
    return scripts


def _imports_torch(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "torch" for a in n.names)
               for n in ast.walk(tree))


def _first_call_line(tree: ast.Module, name: str) -> int | None:
    lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]
    return min(lines) if lines else None


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_stage_that_computes_with_torch_configures_determinism_first(script):
    """Scripts whose rule passes a device, or that import torch, call configure_determinism before
    any other call that could start CUDA (right after configure_logging)."""
    tree = ast.parse((ROOT / "scripts" / script).read_text())
    computes = _rule_scripts().get(script, False) or _imports_torch(tree)
    setup = _first_call_line(tree, "configure_determinism")
    if not computes:
        assert script in _rule_scripts()  # a script of the workflow, checked for a reason
        return
    assert setup is not None, f"scripts/{script} computes with torch but never calls configure_determinism"
    calls = sorted(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call))
    before = [line for line in calls if line < setup]
    assert before == [_first_call_line(tree, "configure_logging")], (
        f"scripts/{script}: calls before configure_determinism on lines {before}")


def test_local_gpus_honours_cuda_visible_devices(clean_env):
    clean_env.setattr(device, "_physical_gpus", lambda: 4)
    assert local_gpus() == 4
    for visible, expected in (("1,2", 2), ("0,-1,2", 1), ("", 0), ("-1", 0), ("0,1,2,3,4,5", 4),
                              ("GPU-aaaa,GPU-bbbb", 2)):
        clean_env.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert local_gpus() == expected, visible
    clean_env.setattr(device, "_physical_gpus", lambda: 0)  # no driver: nothing to see
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert local_gpus() == 0


def test_local_gpus_reads_nvidia_smi_where_the_driver_has_no_proc_entries(clean_env, tmp_path):
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine's driver lists its GPUs in /proc")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: A (UUID: GPU-a)'\necho '  MIG 1g.10gb Device 0: (UUID: MIG-x)'\n"
                    "echo 'GPU 1: B (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    clean_env.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert local_gpus() == 2  # MIG lines are not GPUs of their own
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert local_gpus() == 1


def test_parse_time_gpu_count_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, dnc.device; dnc.device.local_gpus(); "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_claim_slot_gives_each_process_its_own_gpu(tmp_path):
    names = ["GPU-a", "GPU-b"]
    code = (f"import time; from dnc.device import claim_slot; "
            f"print(claim_slot({names!r}, {str(tmp_path)!r}), flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"  # the other job holds the first GPU
        assert claim_slot(names, tmp_path) == 1
        assert claim_slot(names, tmp_path) is None  # both held: the caller shares, with a warning
    finally:
        holder.kill()
        holder.wait()
    assert claim_slot(names, tmp_path) == 0  # released when its process ended


@NO_CUDA
def test_auto_warns_when_a_gpu_seems_assigned_but_torch_cannot_use_it(clean_env, caplog):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    clean_env.setenv("SLURM_JOB_GPUS", "3")
    with caplog.at_level(logging.WARNING, logger="dnc.device"):
        assert resolve_device("auto") == torch.device("cpu")
        resolve_device("auto")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1  # once per process
    assert "CUDA_VISIBLE_DEVICES=0" in warned[0] and "SLURM_JOB_GPUS=3" in warned[0]
    assert torch.__version__ in warned[0]


@NO_CUDA
def test_auto_is_quiet_where_no_gpu_is_expected(clean_env, caplog):
    clean_env.setattr(device, "gpu_signals", lambda: [])
    with caplog.at_level(logging.WARNING, logger="dnc.device"):
        assert resolve_device("auto") == torch.device("cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_gpu_signals_name_the_assignment_unless_every_gpu_is_hidden(clean_env):
    clean_env.setenv("SLURM_JOB_GPUS", "2")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert {"CUDA_VISIBLE_DEVICES=2", "SLURM_JOB_GPUS=2"} <= set(device.gpu_signals())
    for hidden in ("", "-1"):  # every GPU hidden on purpose: no hint at all
        clean_env.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert device.gpu_signals() == []


@NO_CUDA
def test_require_gpu_and_explicit_cuda_raise_without_a_usable_gpu(clean_env):
    clean_env.setenv("DNC_REQUIRE_GPU", "1")
    with pytest.raises(DeviceError, match="DNC_REQUIRE_GPU=1"):
        resolve_device("auto")
    clean_env.delenv("DNC_REQUIRE_GPU")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=re.escape(repr(name))):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolved_device_is_recorded_in_every_output(clean_env, tmp_path):
    dev = resolve_device("cpu")
    write_parquet(pd.DataFrame({"x": [1.0]}), tmp_path / "t.parquet", {"dnc:run": "r"})
    record = read_metadata(tmp_path / "t.parquet", DEVICE_KEY)
    assert record["device"] == str(dev) == "cpu" and record["name"] == "cpu"
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda
    assert record["deterministic"] == torch.are_deterministic_algorithms_enabled()
    assert read_metadata(tmp_path / "t.parquet", "dnc:run") == "r"  # the stage's own keys stay


def test_report_lists_each_stages_devices_and_flags_mixed_ones(clean_env, tmp_path):
    from dnc.report.devices import read_devices, render_device_section

    gpu = {"device": "cuda:0", "name": "NVIDIA H200", "torch": "2.14.1", "cuda": "13.0",
           "deterministic": True, "tf32": {"matmul": False, "cudnn": False}}
    files: dict[str, list[str]] = {"rfm_metrics": [], "rfm_layers": []}
    for run, record in (("a", gpu), ("b", {**gpu, "device": "cpu", "name": "cpu", "deterministic": False})):
        set_device_record(record)
        for key, name in (("rfm_metrics", f"metrics/{run}/metrics.parquet"),
                          ("rfm_layers", f"rfm/{run}/layers.parquet")):
            write_parquet(pd.DataFrame({"x": [1.0]}), tmp_path / name)
            files[key].append(str(tmp_path / name))
    old = tmp_path / "nets" / "c" / "history.parquet"  # written before dnc:device existed
    old.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), old)
    files["net_histories"] = [str(old)]
    devices = read_devices(files).set_index(["stage", "run"])
    assert len(devices) == 3  # a stage's two files of one run make one row
    assert devices.loc[("deep_rfm", "a")].to_dict() == {
        "device": "cuda:0", "name": "NVIDIA H200", "torch": "2.14.1", "cuda": "13.0", "deterministic": "yes",
        "tf32": "off"}
    assert devices.loc[("deep_rfm", "b"), "deterministic"] == "no"
    assert set(devices.loc[("train_network", "c")]) == {"not recorded"}
    html = render_device_section(devices.reset_index())
    assert "<h2>Devices</h2>" in html and "NVIDIA H200" in html and "not recorded" in html
    assert "Mixed devices</b> in deep_rfm:" in html  # train_network has one device (unrecorded)
