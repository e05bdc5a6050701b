"""DUFM trainer: hand-written gradient, convergence to the closed form, failures, determinism."""

import pytest
import torch
from conftest import autograd_gradients, objective_of

from dnc.dufm import DUFMConfig, forward, gradients, init_dufm, targets, train_dufm
from dnc.dufm.model import feature_columns
from dnc.errors import NonFiniteLossError
from dnc.theory import dnc_optimum


def small_cfg(**kw):
    base = dict(K=3, L=3, n=4, width=7, lambda_H1=1e-2, lambda_W=[2e-2, 1e-2, 3e-2], lr=0.5,
                steps=10, init_std=0.7, seed=1)
    base.update(kw)
    return DUFMConfig(**base)


def test_gradient_matches_autograd():
    cfg = small_cfg()
    state = init_dufm(cfg, torch.device("cpu"))
    Y = targets(cfg.K, cfg.n, torch.float64, torch.device("cpu"))
    grads, fit, _ = gradients(state, Y, cfg.lambda_H1, cfg.lambda_W)
    auto = autograd_gradients(state, Y, cfg.lambda_H1, cfg.lambda_W)
    for g, a in zip(grads, auto):
        torch.testing.assert_close(g, a, rtol=1e-12, atol=1e-14)
    assert float(fit) == pytest.approx(objective_of(state, cfg).fit, rel=1e-12)


@pytest.mark.parametrize("L,lr,steps", [(2, 1.0, 20000), (3, 0.5, 60000)])
def test_gradient_descent_reaches_the_closed_form(L, lr, steps):
    cfg = DUFMConfig(K=2, L=L, n=10, width=16, lambda_H1=5e-3, lambda_W=5e-3, lr=lr, steps=steps,
                     tol=1e-11, log_every=1000, seed=0)
    res = train_dufm(cfg, progress=False)
    opt = dnc_optimum(2, L, 10, 5e-3, 5e-3)
    final = res.history[-1]
    assert final["loss"] == pytest.approx(opt.loss, rel=1e-7)
    # The balance invariant of stationary points: every lambda ||.||^2 is equal.
    regs = [final["reg_H1"]] + [final[f"reg_W{l}"] for l in range(1, L + 1)]
    assert max(regs) / min(regs) - 1 < 1e-6
    post, _, Z = forward(res.state)
    M = post[-1].reshape(16, 2, 10).mean(dim=2)  # (d, K) last post-ReLU class means
    cos = (M[:, 0] @ M[:, 1]) / (M[:, 0].norm() * M[:, 1].norm())
    assert abs(float(cos)) < 1e-3


def test_non_finite_loss_names_run_and_step():
    cfg = small_cfg(lr=1e6, steps=200, log_every=1)
    with pytest.raises(NonFiniteLossError, match=r"run 'exploding': non-finite loss .* at step \d+"):
        train_dufm(cfg, run="exploding", progress=False)


def test_same_seed_same_result_and_history_layout():
    a = train_dufm(small_cfg(steps=50, log_every=10), progress=False)
    b = train_dufm(small_cfg(steps=50, log_every=10), progress=False)
    c = train_dufm(small_cfg(steps=50, log_every=10, seed=2), progress=False)
    assert a.history == b.history
    assert a.history != c.history
    assert [h["step"] for h in a.history] == [0, 10, 20, 30, 40, 50]
    assert set(a.history[0]) == {"step", "loss", "fit", "reg_H1", "reg_W1", "reg_W2", "reg_W3",
                                 "grad_norm"}


@pytest.mark.parametrize("optimizer,lr", [("momentum", 0.05), ("adam", 1e-2)])
def test_other_optimizers_decrease_the_loss(optimizer, lr):
    res = train_dufm(small_cfg(optimizer=optimizer, lr=lr, steps=300, log_every=100), progress=False)
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]


def test_float32_runs_and_feature_layout():
    res = train_dufm(small_cfg(dtype="float32", steps=20), progress=False)
    assert res.state.H1.dtype == torch.float32
    cols, labels, pred = feature_columns(res.state)
    names = [c.column for c, _ in cols]
    assert names == ["l1_input", "l2_pre", "l2_post", "l3_pre", "l3_post", "l4_output"]
    assert [c.weight for c, _ in cols] == [1, None, 2, None, 3, None]
    assert all(v.shape == (12, c.dim) for c, v in cols)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and pred.shape == (12,)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimizer"):
        small_cfg(optimizer="sgd")
    with pytest.raises(ValueError, match="lambda_W: 2 values"):
        small_cfg(lambda_W=[1e-2, 1e-2])
