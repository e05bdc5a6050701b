"""Shared fixtures: explicit DNC constructions built without the closed forms under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dnc.dufm.model import DUFMState, Objective, objective, targets
from dnc.settings import DUFMConfig


def dnc_construction(K: int, L: int, n: int, d: int, norms: list[float]) -> DUFMState:
    """An exact DNC point of the L-DUFM with class-mean norms [a, s_2, ..., s_L, c].

    Class means of H_1 and of every hidden layer are norms[l] * e_k (orthogonal, equal norms, no
    within-class spread); W_l maps e_k to (s_{l+1}/s_l) e_k and W_L reads c e_k^T. float64.
    """
    assert d >= K and len(norms) == L + 1
    E = torch.eye(d, dtype=torch.float64)[:, :K]  # (d, K)
    H1 = norms[0] * E.repeat_interleave(n, dim=1)  # (d, N)
    W = [(norms[l + 1] / norms[l]) * (E @ E.T) for l in range(L - 1)]
    W.append((norms[L] / norms[L - 1]) * E.T)  # (K, d)
    return DUFMState(H1=H1, W=W)


def objective_of(state: DUFMState, cfg: DUFMConfig) -> Objective:
    """The library's DUFM objective of state with cfg's K, n and lambdas (class-ordered targets)."""
    return objective(state, targets(cfg.K, cfg.n, state.H1.dtype), cfg.lambda_H1, cfg.lambda_W)


def dnc_head_tables(tmp_path, K: int, n: int, lam: float, norms, scale_last: float = 1.0):
    """A network head that is an exact DNC point (its classifier scaled by scale_last): its DUFM
    objective per epoch (epochs 1 and 7), its metrics at epoch 7 (train split) and its weights."""
    import pandas as pd

    from dnc.dufm.model import feature_columns
    from dnc.io import write_features
    from dnc.metrics.streaming import feature_file_metrics
    from dnc.nets.extract import head_objective

    state = dnc_construction(K, len(norms) - 1, n, 6, list(norms))
    state.W[-1] = state.W[-1] * scale_last
    cols, y, pred = feature_columns(state)
    write_features(tmp_path / "f.parquet", y, cols, pred, metadata={"dnc:step": 7, "dnc:split": "train"})
    weights = {l + 1: W.numpy() for l, W in enumerate(state.W)}
    metrics = feature_file_metrics(tmp_path / "f.parquet", "r", weights=weights, device="cpu")
    terms = head_objective(state.H1.T, y, state.W, K, lam, lam)
    objective = pd.DataFrame([{"epoch": 1, **terms, "loss": 10.0}, {"epoch": 7, **terms}])
    return objective, metrics, weights


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def wait_for_checkpoint(proc, last, epoch: int, timeout: float, poll: float = 0.1) -> None:
    """Wait until the running training process proc has checkpointed epoch (or later) to last;
    fails when it ends first (the test's training must be slow enough to be interrupted)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= epoch:
            break
        time.sleep(poll)
    assert proc.poll() is None, "training finished before it could be interrupted: make it slower"
