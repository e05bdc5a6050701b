"""The same code on CUDA: skipped where no GPU is present (CI), run on GPU machines."""

import numpy as np
import pytest
import torch

from dnc.dufm import DUFMConfig, train_dufm
from dnc.io import write_features
from dnc.layout import FeatureColumn
from dnc.metrics import layer_metrics
from dnc.metrics.streaming import feature_file_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def data(rng, N=3000, K=7, d=300):
    y = rng.integers(0, K, N)
    H = (3 * rng.standard_normal((K, d)))[y] + rng.standard_normal((N, d))
    return H.astype(np.float32), y


def test_metrics_on_cuda_equal_cpu(rng):
    H, y = data(rng)
    W = rng.standard_normal((7, 300))
    cpu = layer_metrics(H, y, weight=W, predictions=y)
    gpu = layer_metrics(torch.tensor(H, device="cuda"), torch.tensor(y, device="cuda"),
                        weight=torch.tensor(W, device="cuda"), predictions=torch.tensor(y, device="cuda"))
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-10, abs=1e-300), key


def test_streaming_on_cuda_equals_cpu(tmp_path, rng):
    H, y = data(rng)
    write_features(tmp_path / "f.parquet", y, [(FeatureColumn("x", 1, "post", 300), H)],
                   row_group_rows=500)
    cpu = feature_file_metrics(tmp_path / "f.parquet", "r", device="cpu", batch_rows=700)
    gpu = feature_file_metrics(tmp_path / "f.parquet", "r", device="cuda", batch_rows=700)
    np.testing.assert_allclose(gpu["value"].to_numpy(), cpu["value"].to_numpy(), rtol=1e-10)


def test_dufm_training_on_cuda_matches_cpu():
    kw = dict(K=2, L=3, n=10, width=16, lambda_H1=5e-3, lambda_W=5e-3, lr=0.5, steps=500, log_every=100)
    cpu = train_dufm(DUFMConfig(**kw, device="cpu"), progress=False)
    gpu = train_dufm(DUFMConfig(**kw, device="cuda"), progress=False)
    assert gpu.state.H1.is_cuda
    for a, b in zip(cpu.history, gpu.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
