"""Same config and seed, run twice on the CPU: identical metric tables (bit for bit)."""

import pandas as pd
from conftest import measured_features

from dnc.dufm.batch import run_batch, run_paths
from dnc.nets.extract import network_features
from dnc.nets.train import restore_net, train_network
from dnc.rfm.stage import run_rfm
from dnc.settings import NetConfig, RFMConfig


def _dufm_metrics(root):
    settings = {"K": 3, "L": 3, "n": 4, "width": 6, "lambda_H1": 5e-3, "lambda_W": 5e-3, "lr": 0.5,
                "steps": 300, "optimizer": "gd", "tol": 0.0, "dtype": "float64", "init_std": None,
                "log_every": 50, "seed": 3}
    runs = {"a": settings, "b": {**settings, "seed": 4}}
    paths = {r: run_paths(r, str(root)) for r in runs}
    run_batch(list(runs), runs, paths, device="cpu", progress=False)
    return pd.concat([pd.read_parquet(paths[r].metrics) for r in runs])


def test_dufm_batches_are_deterministic(tmp_path):
    pd.testing.assert_frame_equal(_dufm_metrics(tmp_path / "1"), _dufm_metrics(tmp_path / "2"))


def _net_metrics(root, data):
    cfg = NetConfig(mlp_widths=(16,), head_layers=2, head_width=8, epochs=3, batch_size=16,
                    feature_epochs=(3,), device="cpu")
    train_network(cfg, data, root, 3, progress=False)
    net, _ = restore_net(root / "epoch3.pt")
    cols, pred = network_features(net, data["train"][0])
    return measured_features(root / "f.parquet", data["train"][1].numpy(), cols, pred, {"dnc:step": 3},
                             run="n")


def test_network_training_is_deterministic(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(20)
    X = (2 * torch.randn(3, 5, generator=g)[y] + torch.randn(60, 5, generator=g))[:, None]
    data = {"train": (X, y), "test": (X, y)}
    pd.testing.assert_frame_equal(_net_metrics(tmp_path / "1", data), _net_metrics(tmp_path / "2", data))


def test_deep_rfm_is_deterministic(rng):
    import numpy as np

    y = np.repeat(np.arange(3), 15)
    X = (3 * rng.standard_normal((3, 6))[y] + rng.standard_normal((45, 6))).astype(np.float32)
    cfg = RFMConfig(dataset="x", depth=2, width=16, device="cpu")
    tables = [run_rfm(cfg, (X, y), (X, y), 3, progress=False).metrics for _ in range(2)]
    pd.testing.assert_frame_equal(*tables)
