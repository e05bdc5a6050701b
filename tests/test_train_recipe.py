"""The AGOP paper's training options (issue 18): the loss as a mean over outputs (nn.MSELoss) and an
optimiser restarted at every epoch, each checked against torch computed here, independently."""

from __future__ import annotations

import math

import pytest
import torch
from test_networks import cfg, gaussian_data
from torch import nn

from dnc.nets.rows import epoch_permutation
from dnc.nets.train import load_checkpoint, restore_net, sample_loss, train_network

K = 4


@pytest.mark.parametrize("kind,targets", [("mse", lambda y: torch.eye(K)[y]),
                                          ("mse_pm1", lambda y: 2 * torch.eye(K)[y] - 1)])
def test_the_mean_reduction_is_nn_mse_loss(kind, targets):
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(9, K, generator=g, dtype=torch.float64), torch.randint(0, K, (9,), generator=g)
    want = nn.MSELoss()(logits, targets(y))
    torch.testing.assert_close(sample_loss(logits, y, kind, "mean").mean(), want, rtol=1e-14, atol=0)
    # The half sum over outputs is K/2 times the mean over them, sample by sample.
    torch.testing.assert_close(sample_loss(logits, y, kind, "half_sum"),
                               K / 2 * ((logits - targets(y)) ** 2).mean(1), rtol=1e-14, atol=0)


def test_the_reduction_leaves_cross_entropy_alone():
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(9, K, generator=g), torch.randint(0, K, (9,), generator=g)
    want = nn.functional.cross_entropy(logits, y, reduction="none")
    for reduction in ("half_sum", "mean"):
        torch.testing.assert_close(sample_loss(logits, y, "ce", reduction), want, rtol=0, atol=0)


def plain(**kw):
    """One batch per epoch, SGD without momentum or any penalty, a constant lr: one update per epoch
    is lr times the gradient of the loss alone."""
    return cfg(**{"batch_size": 1000, "momentum": 0.0, "lambda_H1": 0.0, "lambda_W": 0.0,
                  "weight_decay": 0.0, "schedule": "constant", "lr": 0.1, "epochs": 1,
                  "feature_epochs": (0, 1), **kw})


@pytest.mark.parametrize("reduction,scale", [("mean", 1.0), ("half_sum", K / 2)])
def test_training_and_its_history_use_the_configured_reduction(tmp_path, reduction, scale):
    """The update is lr times the gradient of scale * nn.MSELoss, and the history's train_loss is
    scale * nn.MSELoss of the trained network (scale 1 for "mean", K/2 for "half_sum")."""
    data = gaussian_data()
    X, y = data["train"]
    rows = train_network(plain(loss_reduction=reduction), data, tmp_path, K, progress=False)
    start, _ = restore_net(tmp_path / "epoch0.pt")
    end, _ = restore_net(tmp_path / "epoch1.pt")
    start.train()
    loss = scale * nn.MSELoss()(start(X)[0], torch.eye(K)[y])
    loss.backward()
    for p, q in zip(start.parameters(), end.parameters()):
        torch.testing.assert_close(q, p.detach() - 0.1 * p.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = scale * float(nn.MSELoss()(end(X)[0], torch.eye(K)[y]))
    assert rows[-1]["train_loss"] == pytest.approx(want, rel=1e-5)
    assert rows[-1]["train_loss"] != pytest.approx(want * (K / 2 if reduction == "mean" else 2 / K), rel=1e-2)


def test_cross_entropy_runs_are_the_same_under_both_reductions(tmp_path):
    a = train_network(plain(loss="ce", epochs=2), gaussian_data(), tmp_path / "a", K, progress=False)
    b = train_network(plain(loss="ce", epochs=2, loss_reduction="mean"), gaussian_data(), tmp_path / "b",
                      K, progress=False)
    assert a == b


def adam(**kw):
    return cfg(optimizer="adam", lr=1e-2, **kw)


def steps_in(path) -> set[float]:
    ck = load_checkpoint(path)
    return {float(s["step"]) for s in ck["optimizer"]["state"].values()}


@pytest.mark.parametrize("restart,batch_size,steps", [("epoch", 1000, {1.0}), ("run", 1000, {2.0}),
                                                      ("epoch", 16, {5.0}), ("run", 16, {10.0})])
def test_adams_step_count_restarts_at_every_epoch_only_when_asked(tmp_path, restart, batch_size, steps):
    """80 training rows: 1 or 5 batches per epoch; after epoch 2 Adam has taken the steps of one
    epoch (restart "epoch") or of both ("run")."""
    train_network(adam(optimizer_restart=restart, batch_size=batch_size, epochs=2, feature_epochs=(2,)),
                  gaussian_data(), tmp_path, K, progress=False)
    assert steps_in(tmp_path / "epoch2.pt") == steps


def test_the_first_step_of_epoch_two_is_a_fresh_adams(tmp_path):
    """One batch per epoch: Adam's state and the parameters after epoch 2 are those of a new
    torch.optim.Adam taking one step from epoch 1's parameters on epoch 2's batch, at the schedule's
    lr of global step 1 (cosine over 2 steps: half the base lr)."""
    c = adam(optimizer_restart="epoch", batch_size=1000, epochs=2, feature_epochs=(1, 2), lambda_W=0.0,
             weight_decay=0.0)
    data = gaussian_data()
    train_network(c, data, tmp_path, K, progress=False)
    net, _ = restore_net(tmp_path / "epoch1.pt")
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=c.lr * 0.5 * (1 + math.cos(math.pi * 1 / 2)))
    X, y = data["train"]
    perm = epoch_permutation(len(y), c.seed, 2, torch.device("cpu"))
    z, h = net(X[perm])
    N = len(y)
    loss = (0.5 * ((z - torch.eye(K)[y[perm]]) ** 2).sum(1) + 0.5 * N * c.lambda_H1 * (h**2).sum(1)).mean()
    loss.backward()
    opt.step()
    ck = load_checkpoint(tmp_path / "epoch2.pt")
    names = [n for n, _ in net.named_parameters()]
    mine = opt.state_dict()["state"]
    # The checkpoint's optimiser orders its parameters by group (backbone, then head layers).
    order = [n for n in names if not n.startswith("head.")] + [n for n in names if n.startswith("head.")]
    for i, name in enumerate(order):
        theirs, own = ck["optimizer"]["state"][i], mine[names.index(name)]
        assert float(theirs["step"]) == float(own["step"]) == 1.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(theirs[key], own[key], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(ck["model"][name], dict(net.named_parameters())[name].detach(),
                                   rtol=1e-5, atol=1e-7)


def test_the_schedule_follows_the_runs_global_step_across_restarts(tmp_path):
    a = train_network(adam(schedule="cosine", epochs=4), gaussian_data(), tmp_path / "a", K, progress=False)
    b = train_network(adam(schedule="cosine", epochs=4, optimizer_restart="epoch"), gaussian_data(),
                      tmp_path / "b", K, progress=False)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert len({r["lr"] for r in b}) == 4
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in b]  # the restarts change the run


def test_an_epoch_restarted_run_resumes_as_if_never_interrupted(tmp_path):
    """Killed after epoch 2 and resumed: equal to the uninterrupted run, even with the optimiser state
    of the checkpoint replaced by garbage (a run restarted at every epoch never reads it)."""
    c = adam(optimizer_restart="epoch", epochs=4)
    full = train_network(c, gaussian_data(), tmp_path / "a", K, progress=False)
    train_network(c, gaussian_data(), tmp_path / "b", K, progress=False, stop_after=2)
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    for state in ck["optimizer"]["state"].values():
        state["exp_avg"].fill_(1e3)
        state["step"].fill_(1e6)
    torch.save(ck, tmp_path / "b" / "last.pt")
    resumed = train_network(c, gaussian_data(), tmp_path / "b", K, progress=False)
    assert resumed == full
    a, _ = restore_net(tmp_path / "a" / "epoch4.pt")
    b, _ = restore_net(tmp_path / "b" / "epoch4.pt")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
