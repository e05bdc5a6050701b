"""Shared fixtures: explicit DNC constructions built without the closed forms under test, and a
Snakemake runner on a copy of the workflow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

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


def measured_features(path, labels, columns, predictions=None, metadata=None, weights=None, run="r"):
    """Features written to the feature file at path (dnc.io.write_features: columns are
    (FeatureColumn, (N, d) array) pairs, labels (N,)) and measured as the pipeline measures them
    (dnc.metrics.streaming.feature_file_metrics on the CPU, weights {l: W_l}): the tidy table."""
    from dnc.io import write_features
    from dnc.metrics.streaming import feature_file_metrics

    write_features(path, labels, columns, predictions, metadata=metadata)
    return feature_file_metrics(path, run, weights=weights, device="cpu")


def measured_state(path, state: DUFMState, metadata=None, run="r"):
    """A DUFM point's features (dnc.dufm.model.feature_columns) measured by measured_features with
    its weights: (metrics, weights {l: W_l as numpy}, labels (N,))."""
    from dnc.dufm.model import feature_columns

    cols, y, pred = feature_columns(state)
    weights = {l + 1: W.numpy() for l, W in enumerate(state.W)}
    return measured_features(path, y, cols, pred, metadata, weights, run), weights, y


def state_head_tables(path, state: DUFMState, K: int, lam: float, first_loss: float | None = None):
    """(objective, metrics, weights) of a network head given as an explicit DUFM point, measured as
    the pipeline measures a trained head whose last epoch is 7 (train split); first_loss adds an
    epoch-1 objective row with that loss before it."""
    import pandas as pd

    from dnc.nets.extract import head_objective

    metrics, weights, y = measured_state(path, state, metadata={"dnc:step": 7, "dnc:split": "train"})
    terms = head_objective(state.H1.T, y, state.W, K, lam, lam)
    first = [] if first_loss is None else [{"epoch": 1, **terms, "loss": first_loss}]
    return pd.DataFrame([*first, {"epoch": 7, **terms}]), metrics, weights


def dnc_head_tables(tmp_path, K: int, n: int, lam: float, norms, scale_last: float = 1.0):
    """A network head that is an exact DNC point (its classifier scaled by scale_last): its DUFM
    objective per epoch (epochs 1 and 7), its metrics at epoch 7 (train split) and its weights."""
    state = dnc_construction(K, len(norms) - 1, n, 6, list(norms))
    state.W[-1] = state.W[-1] * scale_last
    return state_head_tables(tmp_path / "f.parquet", state, K, lam, first_loss=10.0)


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


def autograd_gradients(state: DUFMState, Y: torch.Tensor, lambda_H1, lambda_W) -> tuple[torch.Tensor, ...]:
    """Reference gradients of the DUFM objective by torch autograd, for the hand-written ones of
    dnc.dufm.model.gradients: one run (2-D parameters, lambdas numbers) or a batch (a leading run
    axis, lambda_H1 and each lambda_W a number or a (B,) tensor), whose loss is the sum of its runs'
    (runs do not interact). Y: (K, N) targets."""
    params = [p.clone().requires_grad_(True) for p in state.params()]
    post = params[0]
    for W in params[1:-1]:
        post = torch.relu(W @ post)
    loss = ((params[-1] @ post - Y) ** 2).sum() / (2 * Y.shape[-1])
    loss = loss + (lambda_H1 / 2 * (params[0] ** 2).sum((-2, -1))).sum()
    loss = loss + sum((lam / 2 * (W ** 2).sum((-2, -1))).sum() for lam, W in zip(lambda_W, params[1:]))
    return torch.autograd.grad(loss, params)


WORKFLOW_FILES = ("Snakefile", "workflow", "scripts", "config", "examples")


def workdir_copy(tmp: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, scripts, configs, examples) in the folder tmp."""
    root = Path(__file__).resolve().parents[1]
    for name in WORKFLOW_FILES:
        src = root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    return tmp


def run_snakemake(wd: Path, config: dict, *args: str, env: dict | None = None, cores: int = 2,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """Snakemake in a subprocess on the workflow copy wd with config (written to
    wd/test-config.yaml), extra command-line args, env and a timeout in seconds: the
    CompletedProcess (robust across Snakemake 9.x, whose Python API signatures move)."""
    (wd / "test-config.yaml").write_text(yaml.safe_dump(config))
    # --configfile takes several values: everything else goes before it.
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(wd), "--snakefile", str(wd / "Snakefile"),
           "--cores", str(cores), "--workflow-profile", "none", *args,
           "--configfile", str(wd / "test-config.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
