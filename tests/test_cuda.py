"""The same code on CUDA against the CPU: skipped where no GPU is present (CI), run on GPU machines.

benchmarks/gpu_check.sh sets DNC_REQUIRE_CUDA=1: there a machine whose torch cannot see its GPU
fails this module instead of skipping it, so it cannot look green.
"""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from dnc.dufm import DUFMConfig, train_dufm
from dnc.io import write_features
from dnc.layout import FeatureColumn
from dnc.metrics import Convention, layer_metrics
from dnc.metrics.streaming import feature_file_metrics, ood_file_metrics

if os.environ.get("DNC_REQUIRE_CUDA") == "1" and not torch.cuda.is_available():
    raise RuntimeError(f"DNC_REQUIRE_CUDA=1 but torch {torch.__version__} (CUDA build "
                       f"{torch.version.cuda}) sees no CUDA device; CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def data(rng, N=3000, K=7, d=300):
    y = rng.integers(0, K, N)
    H = (3 * rng.standard_normal((K, d)))[y] + rng.standard_normal((N, d))
    return H.astype(np.float32), y


def assert_tables_close(gpu: pd.DataFrame, cpu: pd.DataFrame, rtol: float, atol: float = 0.0) -> None:
    keys = [c for c in ("run", "layer", "representation", "split", "step", "metric") if c in cpu]
    a, b = (t.sort_values(keys).reset_index(drop=True) for t in (cpu, gpu))
    pd.testing.assert_frame_equal(a[keys], b[keys])
    np.testing.assert_allclose(b["value"].to_numpy(), a["value"].to_numpy(), rtol=rtol, atol=atol,
                               equal_nan=True)


def test_metrics_on_cuda_equal_cpu(rng):
    H, y = data(rng)
    W = rng.standard_normal((7, 300))
    cpu = layer_metrics(H, y, weight=W, predictions=y)
    gpu = layer_metrics(torch.tensor(H, device="cuda"), torch.tensor(y, device="cuda"),
                        weight=torch.tensor(W, device="cuda"), predictions=torch.tensor(y, device="cuda"))
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-10, abs=1e-300), key


def test_metrics_with_spectra_and_more_classes_than_dimensions(rng):
    H, y = data(rng, N=4000, K=60, d=20)
    conv = Convention(spectra=True)
    cpu = layer_metrics(H, y, convention=conv)
    gpu = layer_metrics(torch.tensor(H, device="cuda"), torch.tensor(y, device="cuda"), convention=conv)
    assert set(gpu) == set(cpu)
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-8, abs=1e-12, nan_ok=True), key


def test_streaming_on_cuda_equals_cpu(tmp_path, rng):
    H, y = data(rng)
    write_features(tmp_path / "f.parquet", y, [(FeatureColumn("x", 1, "post", 300), H)],
                   row_group_rows=500)
    cpu = feature_file_metrics(tmp_path / "f.parquet", "r", device="cpu", batch_rows=700)
    gpu = feature_file_metrics(tmp_path / "f.parquet", "r", device="cuda", batch_rows=700)
    np.testing.assert_allclose(gpu["value"].to_numpy(), cpu["value"].to_numpy(), rtol=1e-10)


def test_nc5_on_cuda_equals_cpu(tmp_path, rng):
    H, y = data(rng)
    ood, _ = data(np.random.default_rng(1), N=500)
    col = [FeatureColumn("x", 1, "post", 300)]
    write_features(tmp_path / "id.parquet", y, [(col[0], H)], metadata={"dnc:step": 1})
    write_features(tmp_path / "ood.parquet", np.zeros(500, dtype=np.int64), [(col[0], ood + 2)],
                   metadata={"dnc:step": 1})
    tables = [ood_file_metrics(tmp_path / "id.parquet", tmp_path / "ood.parquet", "r", device=dev,
                               batch_rows=600) for dev in ("cpu", "cuda")]
    assert_tables_close(tables[1], tables[0], rtol=1e-10)


def test_dufm_training_on_cuda_matches_cpu():
    kw = dict(K=2, L=3, n=10, width=16, lambda_H1=5e-3, lambda_W=5e-3, lr=0.5, steps=500, log_every=100)
    cpu = train_dufm(DUFMConfig(**kw, device="cpu"), progress=False)
    gpu = train_dufm(DUFMConfig(**kw, device="cuda"), progress=False)
    assert gpu.state.H1.is_cuda
    for a, b in zip(cpu.history, gpu.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)


def test_batched_dufm_job_on_cuda_matches_cpu(tmp_path):
    from dnc.dufm.batch import run_batch, run_paths

    settings = {"K": 3, "L": 3, "n": 4, "width": 6, "lambda_H1": 5e-3, "lambda_W": 5e-3, "lr": 0.5,
                "steps": 2000, "optimizer": "gd", "tol": 0.0, "dtype": "float64", "init_std": None,
                "log_every": 500, "seed": 3}
    runs = {"a": settings, "b": {**settings, "seed": 4}}
    tables = []
    for dev in ("cpu", "cuda"):
        paths = {r: run_paths(r, str(tmp_path / dev)) for r in runs}
        run_batch(list(runs), runs, paths, device=dev, progress=False)
        tables.append(pd.concat([pd.read_parquet(paths[r].metrics) for r in runs]))
    assert_tables_close(tables[1], tables[0], rtol=1e-7, atol=1e-12)


def _blobs(K=4, n=40, shape=(1, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 2 * torch.randn(K, int(np.prod(shape)), generator=g)
    y = torch.arange(K).repeat_interleave(n)
    X = (mu[y] + torch.randn(K * n, mu.shape[1], generator=g)).reshape(K * n, *shape)
    return {"train": (X, y), "test": (X.flip(0), y.flip(0))}


def _net_cfg(**kw):
    from dnc.settings import NetConfig

    base = dict(arch="mlp", mlp_widths=(32,), head_layers=2, head_width=16, lr=0.05, epochs=3,
                batch_size=16, lambda_H1=1e-4, lambda_W=1e-3, feature_epochs=(3,))
    return NetConfig(**{**base, **kw})


def test_network_training_features_and_analysis_on_cuda_match_cpu(tmp_path):
    from dnc.nets.analysis import analyze_splits
    from dnc.nets.extract import network_features
    from dnc.nets.train import restore_net, train_network

    data = _blobs()
    hist = {dev: train_network(_net_cfg(device=dev), data, tmp_path / dev, 4, progress=False)
            for dev in ("cpu", "cuda")}
    for a, b in zip(hist["cpu"], hist["cuda"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    nets = {dev: restore_net(tmp_path / dev / "epoch3.pt", device=dev)[0] for dev in hist}
    # The same float32 parameters on both devices isolate extraction and analysis from training.
    nets["cuda"].load_state_dict(nets["cpu"].state_dict())
    feats = {dev: network_features(nets[dev], data["train"][0].to(dev)) for dev in nets}
    for (ca, a), (cb, b) in zip(feats["cpu"][0], feats["cuda"][0]):
        assert ca == cb
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    tables = [analyze_splits(nets[dev], {s: (X.to(dev), y.to(dev)) for s, (X, y) in data.items()}, 3)
              for dev in ("cpu", "cuda")]
    assert_tables_close(tables[1], tables[0], rtol=1e-3, atol=1e-6)


def _resnet_run(root):
    from dnc.nets.train import restore_net, train_network

    data = _blobs(K=3, n=16, shape=(3, 8, 8))
    cfg = _net_cfg(arch="resnet20", mlp_widths=(), head_width=64, device="cuda", epochs=3,
                   feature_epochs=(3,))
    hist = train_network(cfg, data, root, 3, progress=False)
    return hist, restore_net(root / "epoch3.pt")[0]


def _deterministic() -> None:
    from dnc import device

    configure = getattr(device, "configure_determinism", None)
    if configure is not None:
        configure()


def test_resnet20_training_on_cuda_is_bit_for_bit_repeatable(tmp_path):
    _deterministic()
    (h1, a), (h2, b) = _resnet_run(tmp_path / "1"), _resnet_run(tmp_path / "2")
    assert h1 == h2
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resumed_cuda_run_equals_an_uninterrupted_one(tmp_path):
    from dnc.nets.train import restore_net, train_network

    _deterministic()
    data = _blobs(K=3, n=16, shape=(3, 8, 8))
    cfg = _net_cfg(arch="resnet20", mlp_widths=(), head_width=64, device="cuda", optimizer="adam",
                   lr=1e-3, epochs=4, feature_epochs=(4,))
    full = train_network(cfg, data, tmp_path / "a", 3, progress=False)
    train_network(cfg, data, tmp_path / "b", 3, progress=False, stop_after=2)
    resumed = train_network(cfg, data, tmp_path / "b", 3, progress=False)
    assert resumed == full
    a, _ = restore_net(tmp_path / "a" / "epoch4.pt")
    b, _ = restore_net(tmp_path / "b" / "epoch4.pt")
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
