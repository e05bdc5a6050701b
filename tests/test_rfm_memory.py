"""Deep RFM memory: only the next layer's input outlives a layer, the whole-run plan counts what is
kept, paper.yaml's jobs fit their mem_mb, and a run that does not fit is refused before layer 1."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dnc.rfm.deep as deep_module
import dnc.rfm.plan as plan_module
from dnc.config import dataset_specs, expand_rfm_runs
from dnc.data import DatasetSpec
from dnc.data.sources import sample_shape
from dnc.metrics import Convention
from dnc.rfm import RFMMemoryError, deep_rfm
from dnc.rfm.plan import check_plan, plan_deep_rfm
from dnc.rfm.stage import plan_job, plan_rfm, run_rfm
from dnc.settings import RFMConfig

ROOT = Path(__file__).resolve().parents[1]
# Rows of the official train and test splits (torchvision's MNIST, SVHN "train"/"test", CIFAR-10).
SPLIT_ROWS = {"mnist": {"train": 60000, "test": 10000}, "svhn": {"train": 73257, "test": 26032},
              "cifar10": {"train": 50000, "test": 10000}}


def _data(n=90, m=30, d=12, K=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n + m) % K
    X = (2 * rng.standard_normal((K, d))[y] + rng.standard_normal((n + m, d))).astype(np.float32)
    return (X[:n], y[:n]), (X[n:], y[n:])


def test_only_the_next_layers_input_outlives_a_layer(monkeypatch):
    (X, y), (Xt, _) = _data()
    seen: list[dict[str, weakref.ref]] = []
    fits = []

    def on_layer(rec):
        assert set(rec.train) == set(rec.test) == {"input", "projected", "mapped"}
        seen.append({f"{s}.{k}": weakref.ref(v) for s, reps in (("train", rec.train), ("test", rec.test))
                     for k, v in reps.items()})

    def fit(Xl, *args, **kwargs):  # at every kernel fit: nothing of the earlier layers is alive
        fits.append(sorted(name for refs in seen for name, r in refs.items() if r() is not None))
        return real(Xl, *args, **kwargs)

    real = deep_module.kernel_agop
    monkeypatch.setattr(deep_module, "kernel_agop", fit)
    layers = deep_rfm(X, y, depth=3, width=16, X_test=Xt, record=(), on_layer=on_layer, progress=False)
    assert fits == [[], [], []] and len(seen) == 3
    assert all(r() is None for refs in seen for r in refs.values())
    assert all(la.train == {} and la.test == {} and la.width == 16 for la in layers)


def test_plan_counts_the_kept_representations():
    (X, y), (Xt, _) = _data()
    layers = deep_rfm(X, y, depth=3, width=16, X_test=Xt, record=("input", "mapped"), keep_maps=True,
                      progress=False)
    kept = sum(t.nbytes for la in layers for reps in (la.train, la.test) for t in reps.values())
    kept += sum(t.nbytes for la in layers for t in (la.S, la.W) if t is not None)
    # On a CUDA run they are kept on the host: the plan's host part counts them.
    plan = plan_deep_rfm(90, 30, 12, 3, 3, width=16, device="cuda", record=("input", "mapped"),
                         keep_maps=True)
    assert plan.host["representations kept (3 layers)"] == kept
    assert plan.device_parts["kernel fit + AGOP (n x n kernel)"] > 90 * 90 * 8
    # On the CPU, whatever a layer keeps stays counted at every later layer's peak.
    cpu = plan_deep_rfm(90, 30, 12, 3, 3, width=16, record=("input", "mapped"))
    assert cpu.peak_layer == 3 and cpu.device_parts == {}
    assert cpu.host["representations kept from layers 1-2"] == sum(
        t.nbytes for la in layers[:2] for reps in (la.train, la.test) for t in reps.values())


def _paper_jobs():
    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    specs = dataset_specs(config)
    for run, settings in expand_rfm_runs(config).items():
        spec = DatasetSpec(**specs[settings["dataset"]])
        yield run, RFMConfig.from_settings(settings), spec, config


def test_paper_rfm_jobs_fit_their_mem_mb(monkeypatch):
    refused = 0
    for run, cfg, spec, config in _paper_jobs():
        res = config["rfm_resources"]
        assert res["gpu"] == 1  # so the run is on CUDA: the device part goes to the GPU
        conv = Convention(**config["metrics"]["convention"])
        d = int(np.prod(sample_shape(spec)))
        plan = plan_job(cfg, SPLIT_ROWS[spec.name], d, 10, "cuda", conv)
        assert plan.host_bytes < res["mem_mb"] * 10**6, (run, plan.host)
        # docs/rfm.md: the n = 50,000 runs fit an 80 GB GPU in float64.
        assert plan.device_bytes < 80 * 10**9, (run, plan.device_parts)
        if cfg.agop:  # the n x n kernel sets the GPU peak (the ablation fits no kernel)
            assert max(plan.device_parts, key=plan.device_parts.get).startswith("kernel fit")
        # Keeping every representation on the host (as before, or with write_features) would not
        # fit the cosine CIFAR-10 jobs (3,072 columns at every layer): refused before layer 1.
        kept = plan_job(replace(cfg, write_features=True), SPLIT_ROWS[spec.name], d, 10, "cuda", conv)
        if spec.name == "cifar10" and cfg.feature_map == "cosine":
            assert kept.host_bytes > res["mem_mb"] * 10**6
            monkeypatch.setattr(plan_module, "available_bytes",
                                lambda dev: 2**50 if torch.device(dev).type == "cuda" else 2**42)
            with pytest.raises(RFMMemoryError, match=r"host \(cpu\).*largest part: representations kept"
                                                    r".*the job's limit 59\.60 GiB \(mem_mb\)"):
                check_plan(kept, "Deep RFM", cfg.n, host_limit=res["mem_mb"] * 10**6)
            refused += 1
    assert refused  # the cosine CIFAR-10 jobs were there


def test_refused_before_layer_1_with_the_numbers(monkeypatch):
    train, test = _data()
    cfg = RFMConfig(dataset="x", depth=2, width=16, device="cpu", write_features=True)
    monkeypatch.setattr(deep_module, "kernel_agop", lambda *a, **k: pytest.fail("a kernel was fitted"))
    called = []
    with pytest.raises(RFMMemoryError) as err:
        run_rfm(cfg, train, test, 3, host_limit=1, on_layer=called.append, progress=False)
    assert called == []
    need = plan_rfm(cfg, 90, 30, 12, 3, "cpu").host_bytes
    msg = str(err.value)
    assert f"needs about {need / 2**20:.1f} MiB on host (cpu) at layer" in msg
    assert re.search(r"only 0\.0 MiB is available \(the job's limit 0\.0 MiB \(mem_mb\) less the "
                     r"[0-9.]+ (MiB|GiB) this process holds\)", msg)
    assert "largest part: " in msg


def test_device_refusal_names_the_device_and_the_kernel(monkeypatch):
    plan = plan_deep_rfm(50000, 10000, 3072, 10, 20, feature_map="cosine", device="cuda:0", record=())
    monkeypatch.setattr(plan_module, "available_bytes", lambda dev: 16 * 2**30)
    with pytest.raises(RFMMemoryError, match=r"on cuda:0 at layer \d+ \(estimate, largest part: kernel fit"
                                             r".*only 16\.00 GiB is available"):
        check_plan(plan, "Deep RFM", 50000)
    monkeypatch.setenv("DNC_RFM_NO_MEMCHECK", "1")
    check_plan(plan, "Deep RFM", 50000)  # skipped on request


_CHILD = """
import json, tempfile
import numpy as np
from dnc.io import write_features
from dnc.rfm.stage import feature_columns, plan_rfm, run_rfm
from dnc.settings import RFMConfig
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field + ':'))
def run(n, m):  # as scripts/deep_rfm.py: run, then write the features when asked
    res = run_rfm(cfg, (X[:n], y[:n]), (X[-m:], y[-m:]), 10, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for split in ('train', 'test') if cfg.write_features else ():
            write_features(tmp + '/' + split, res.labels[split], feature_columns(res.layers, split))
rng = np.random.default_rng(0)
n, m, d = 1500, 300, 64
y = np.arange(n + m) % 10
X = (rng.standard_normal((10, d))[y] + rng.standard_normal((n + m, d))).astype(np.float32)
cfg = RFMConfig(dataset='x', depth=2, width=256, device='cpu', write_features=FEATURES)
run(64, 16)  # warm-up: libraries and pools outside the measured peak
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS')
run(n, m)
print(json.dumps([status('VmHWM') - base, plan_rfm(cfg, n, m, d, 10, 'cpu').host_bytes]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("features", [False, True])
def test_host_estimate_bounds_the_measured_peak(features):
    code = _CHILD.replace("FEATURES", str(features))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured, estimate = json.loads(out.stdout.strip().splitlines()[-1])
    # An upper bound (10% for the allocator's rounding), and not a loose one.
    assert 0.4 * estimate < measured < 1.1 * estimate, (measured, estimate)


@pytest.mark.slow
def test_workflow_job_is_refused_under_its_mem_mb(tmp_path):
    for name in ("Snakefile", "workflow", "scripts", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    config = {"device": "cpu",
              "datasets": {"blobs": {"name": "gaussian", "gaussian": {"K": 3, "dim": 5, "n": 30}}},
              "rfm": {"experiments": {"rfm": {"dataset": "blobs", "depth": 2, "width": 16}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    target = "results/rfm/rfm-s0/layers.parquet"
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", target, "--directory", str(tmp_path), "--snakefile",
         str(tmp_path / "Snakefile"), "--cores", "1", "--workflow-profile", "none",
         "--set-resources", "deep_rfm:mem_mb=1", "--configfile", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    log = (tmp_path / "logs/deep_rfm/rfm-s0.log").read_text()
    assert "RFMMemoryError" in log and "the job's limit 1.0 MiB (mem_mb)" in log, out.stderr[-3000:]
    assert "layer 1 of 2" not in log and not (tmp_path / target).exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_run_stays_within_its_device_estimate_and_matches_the_cpu():
    train, test = _data(n=600, m=200, d=40, K=4)
    cfg = RFMConfig(dataset="x", depth=3, width=64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gpu = run_rfm(cfg, train, test, 4, progress=False).metrics
    assert torch.cuda.max_memory_allocated() - base <= plan_rfm(cfg, 600, 200, 40, 4, "cuda").device_bytes
    cpu = run_rfm(replace(cfg, device="cpu"), train, test, 4, progress=False).metrics
    keys = ["layer", "representation", "split", "metric"]
    both = cpu.merge(gpu, on=keys, suffixes=("_cpu", "_gpu"))
    assert len(both) == len(cpu) == len(gpu)
    nc1 = both[both["metric"] == "nc1_trace"]
    assert np.allclose(nc1["value_gpu"], nc1["value_cpu"], rtol=1e-6)
