"""Batched DUFM training: every run of a batch equals its one-run train_dufm result."""

import math

import pytest
import torch
from conftest import autograd_gradients

from dnc.dufm import (
    DUFMConfig,
    DUFMState,
    gradients,
    init_dufm,
    objective,
    targets,
    train_dufm,
    train_dufm_batch,
)
from dnc.dufm.train import _Update
from dnc.errors import NonFiniteLossError

BASE = dict(K=3, L=3, n=4, width=7, lambda_H1=1e-2, lambda_W=2e-2, init_std=0.7)
LR = {"gd": 0.5, "momentum": 0.05, "adam": 1e-2}


def cfg(**kw) -> DUFMConfig:
    return DUFMConfig(**{**BASE, **kw})


def assert_same(got, want, rel=1e-10):
    """Same steps, convergence and history rows; parameters equal to rel (relative to each matrix's
    largest entry); history values to rel."""
    assert (got.steps, got.converged) == (want.steps, want.converged)
    assert [r["step"] for r in got.history] == [r["step"] for r in want.history]
    for g, w in zip(got.history, want.history):
        assert g.keys() == w.keys()
        assert all(g[k] == pytest.approx(w[k], rel=rel, abs=0) for k in w), (g, w)
    for p, q in zip(got.state.params(), want.state.params()):
        assert p.shape == q.shape and p.dtype == q.dtype and p.device == q.device
        torch.testing.assert_close(p, q, rtol=rel, atol=rel * float(q.abs().max()))


def stack(states: list[DUFMState]) -> DUFMState:
    return DUFMState(torch.stack([s.H1 for s in states]),
                     [torch.stack(w) for w in zip(*(s.W for s in states))])


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "adam"])
def test_every_run_of_a_batch_equals_its_one_run_training(optimizer):
    lr = LR[optimizer]
    # A tol that stops run 3 early: 1.5x its one-run gradient norm at step 200 (far from the boundary).
    probe = train_dufm(cfg(optimizer=optimizer, lr=lr, seed=3, steps=200, log_every=5), progress=False)
    tol = 1.5 * probe.history[-1]["grad_norm"]
    cfgs = [
        cfg(optimizer=optimizer, lr=lr, seed=0, steps=120, log_every=10),
        cfg(optimizer=optimizer, lr=0.6 * lr, seed=1, lambda_H1=3e-2, steps=97, log_every=7),
        cfg(optimizer=optimizer, lr=lr, seed=2, lambda_W=[1e-2, 2e-2, 3e-2], steps=150, log_every=25),
        cfg(optimizer=optimizer, lr=lr, seed=3, steps=400, log_every=5, tol=tol),
        cfg(optimizer=optimizer, lr=0.8 * lr, seed=4, init_std=0.3, steps=0, log_every=1),
        cfg(optimizer=optimizer, lr=lr, seed=5, lambda_W=5e-3, steps=60, log_every=60),
    ]
    runs = [f"run{i}" for i in range(len(cfgs))]
    batch = train_dufm_batch(cfgs, runs, progress=False)
    for c, r, got in zip(cfgs, runs, batch):
        assert_same(got, train_dufm(c, run=r, progress=False))
    assert batch[3].converged and batch[3].steps <= 200
    assert [len(r.history) for r in batch] == [13, 15, 7, len(batch[3].history), 1, 2]


def test_same_lr_seed_sweep_and_progress_bar():
    """The common sweep: only the seed differs (the update then takes lr as a scalar)."""
    cfgs = [cfg(optimizer="gd", lr=0.5, seed=s, steps=80, log_every=20) for s in range(4)]
    batch = train_dufm_batch(cfgs, [f"s{s}" for s in range(4)], progress=True)
    for c, got in zip(cfgs, batch):
        assert_same(got, train_dufm(c, progress=False))


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "adam"])
def test_float32_batch(optimizer):
    cfgs = [cfg(optimizer=optimizer, lr=LR[optimizer] * (1 - 0.2 * s), seed=s, steps=40, log_every=10,
                dtype="float32") for s in range(3)]
    batch = train_dufm_batch(cfgs, ["a", "b", "c"], progress=False)
    for c, got in zip(cfgs, batch):
        assert got.state.H1.dtype == torch.float32 and got.state.H1.shape == (7, 12)
        assert_same(got, train_dufm(c, progress=False), rel=1e-4)  # float32 rounding, not 1e-10


@pytest.mark.parametrize("key,value", [("width", 8), ("K", 4), ("L", 2), ("n", 5), ("dtype", "float32"),
                                       ("optimizer", "adam"), ("device", "meta")])
def test_runs_of_different_shape_or_rule_are_rejected(key, value):
    kw = {"lambda_W": 2e-2} if key == "L" else {}
    cfgs = [cfg(lr=0.1, steps=3), cfg(lr=0.1, steps=3, **kw, **{key: value})]
    with pytest.raises(ValueError, match=rf"must share '{key}'.*run 'a' has .* run 'b' has {key}="):
        train_dufm_batch(cfgs, ["a", "b"], progress=False)


def test_argument_checks():
    assert train_dufm_batch([], [], progress=False) == []
    with pytest.raises(ValueError, match="2 configs but 1 run names"):
        train_dufm_batch([cfg(lr=0.1, steps=1)] * 2, ["a"], progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        train_dufm_batch([cfg(lr=0.1, steps=1)], ["a"], progress=False, on_nonfinite="ignore")


def test_batched_gradient_matches_autograd_and_the_objective():
    cfgs = [cfg(lr=0.1, steps=1, seed=s, lambda_H1=1e-2 * (s + 1), lambda_W=[1e-2, 2e-2 * (s + 1), 3e-2])
            for s in range(3)]
    state = stack([init_dufm(c, torch.device("cpu")) for c in cfgs])
    Y = targets(3, 4, torch.float64)
    lam_H = torch.tensor([c.lambda_H1 for c in cfgs], dtype=torch.float64)  # (B,)
    lam_W = [torch.tensor(v, dtype=torch.float64) for v in zip(*(c.lambda_W for c in cfgs))]
    grads, fit, sq = gradients(state, Y, lam_H, lam_W)
    assert fit.shape == (3,) and sq.shape == (3, 4)
    for g, a in zip(grads, autograd_gradients(state, Y, lam_H, lam_W)):
        torch.testing.assert_close(g, a, rtol=1e-12, atol=1e-14)
    for b, c in enumerate(cfgs):  # each run's terms are its one-run objective
        one = objective(DUFMState(state.H1[b], [W[b] for W in state.W]), Y, c.lambda_H1, c.lambda_W)
        assert float(fit[b]) == pytest.approx(one.fit, rel=1e-13)
        assert 0.5 * c.lambda_H1 * float(sq[b, 0]) == pytest.approx(one.reg_H1, rel=1e-13)
    # One number per lambda applies to every run of the batch.
    same, _, _ = gradients(state, Y, 1e-2, [2e-2] * 3)
    single, _, _ = gradients(DUFMState(state.H1[1], [W[1] for W in state.W]), Y, 1e-2, [2e-2] * 3)
    for g, s in zip(same, single):
        torch.testing.assert_close(g[1], s, rtol=1e-13, atol=1e-15)


def test_written_out_adam_is_torch_adam():
    """torch.optim.Adam is elementwise, so on a batch of runs sharing lr it is Adam per run; the
    written-out update equals it bit for bit, and with one lr per run equals Adam run by run."""
    torch.manual_seed(0)
    params = [torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)]
    ours, ref = [p.clone() for p in params], [p.clone() for p in params]
    update, opt = _Update("adam", [0.01] * 4, ours), torch.optim.Adam(ref, lr=0.01)
    lrs = [0.01, 0.02, 0.005, 0.03]
    per_run = [p.clone() for p in params]
    update_per_run = _Update("adam", lrs, per_run)
    refs = [[p[b].clone() for p in params] for b in range(4)]
    opts = [torch.optim.Adam(r, lr=lr) for r, lr in zip(refs, lrs)]
    for _ in range(20):
        grads = [torch.sin(3 * p) + p ** 2 for p in ours]
        update(grads)
        for p, g in zip(ref, grads):
            p.grad = g
        opt.step()
        update_per_run([torch.sin(3 * p) + p ** 2 for p in per_run])
        for r, o in zip(refs, opts):
            for p in r:
                p.grad = torch.sin(3 * p) + p ** 2
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    for b in range(4):
        for p, r in zip(per_run, refs[b]):
            torch.testing.assert_close(p[b], r, rtol=1e-13, atol=1e-15)


def test_non_finite_run_raises_or_stops():
    cfgs = [cfg(lr=0.5, seed=0, steps=60, log_every=5), cfg(lr=1e6, seed=1, steps=200, log_every=1)]
    with pytest.raises(NonFiniteLossError, match=r"run 'exploding': non-finite loss .* at step \d+"):
        train_dufm_batch(cfgs, ["fine", "exploding"], progress=False)
    fine, exploding = train_dufm_batch(cfgs, ["fine", "exploding"], progress=False, on_nonfinite="stop")
    assert_same(fine, train_dufm(cfgs[0], progress=False))
    assert not exploding.converged and exploding.steps < 200
    finite = [math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in exploding.history]
    assert finite == [True] * (len(finite) - 1) + [False]  # the row that stopped it comes last


def test_run_batch_writes_a_diverged_run_as_a_result(tmp_path):
    """The batch job unit: the diverged run gets every output file, no metrics, an empty comparison
    and the verdict "diverged" at its stopping step; the other run is measured as usual."""
    import pandas as pd

    from dnc.config import expand_dufm_runs
    from dnc.dufm.batch import run_batch, run_paths
    from dnc.io import read_metadata

    config = {"dufm": {"defaults": {"K": 2, "L": 3, "n": 4, "width": 6, "lambda": 0.005, "steps": 200,
                                    "log_every": 1},
                       "experiments": {"e": {"grid": {"lr": [0.5, 1.0e6]}}}}}
    runs = expand_dufm_runs(config)
    paths = {r: run_paths(r, str(tmp_path)) for r in runs}
    verdicts = run_batch(list(runs), runs, paths, progress=False).set_index("run")
    bad, good = paths["e-lr1e+06-s0"], paths["e-lr0.5-s0"]
    history = pd.read_parquet(bad.history)
    assert verdicts.at["e-lr1e+06-s0", "verdict"] == "diverged"
    assert verdicts.at["e-lr1e+06-s0", "steps"] == history["step"].iloc[-1] < 200
    assert read_metadata(bad.features, "dnc:diverged_step") == history["step"].iloc[-1]
    assert pd.read_parquet(bad.metrics).empty and pd.read_parquet(bad.comparison).empty
    assert verdicts.at["e-lr0.5-s0", "verdict"] != "diverged"
    assert len(pd.read_parquet(good.metrics)) > 0 and len(pd.read_parquet(good.comparison)) > 0
