"""Relative train error and matched epochs (dnc.nets.matched, docs/agop.md "Matched training loss")
against networks whose outputs Z and targets T are computed here."""

import math

import pandas as pd
import pytest
import torch

from dnc.nets.epoch import sample_loss
from dnc.nets.matched import error_per_loss, matched_epochs, relative_train_error
from dnc.nets.train import restore_net, train_network
from dnc.settings import NetConfig

K, D, EPOCHS = 3, 6, 6


def blobs(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 1.5 * torch.randn(K, D, generator=g)
    y = torch.arange(K).repeat_interleave(n)
    return (mu[y] + torch.randn(K * n, D, generator=g))[:, None], y  # (N, 1, D)


def direct_error(net, X, y, loss):
    """||Z - T||_F^2 / ||T||_F^2 from the network's outputs and the targets written out."""
    with torch.no_grad():
        Z = net(X)[0].double()
    T = torch.nn.functional.one_hot(y, K).double()
    if loss == "mse_pm1":
        T = 2 * T - 1
    return float((Z - T).square().sum() / T.square().sum())


@pytest.fixture(scope="module", params=[("mse", "half_sum"), ("mse_pm1", "half_sum"), ("mse", "mean"),
                                        ("mse_pm1", "mean")])
def trained(request, tmp_path_factory):
    loss, reduction = request.param
    X, y = blobs()
    cfg = NetConfig(arch="plain", head_layers=2, head_width=16, head_init="xavier", head_init_gain=0.5,
                    loss=loss, loss_reduction=reduction, optimizer="adam", lr=1e-2, schedule="constant",
                    epochs=EPOCHS, batch_size=16, lambda_H1=0.0, lambda_W=0.0, weight_decay=0.0,
                    feature_epochs=tuple(range(EPOCHS + 1)), device="cpu")
    out = tmp_path_factory.mktemp(f"{loss}_{reduction}")
    history = pd.DataFrame(train_network(cfg, {"train": (X, y), "test": (X, y)}, out, K, progress=False))
    direct = {e: direct_error(restore_net(out / f"epoch{e}.pt")[0], X, y, loss) for e in range(EPOCHS + 1)}
    return cfg, history, direct


def test_relative_train_error_is_the_one_of_the_outputs(trained):
    cfg, history, direct = trained
    got = relative_train_error(history, cfg, K)
    assert list(got.index) == list(range(1, EPOCHS + 1))  # epoch 0 has no loss in the history
    for e, value in got.items():
        assert value == pytest.approx(direct[e], rel=1e-5), e
    assert got.iloc[-1] < 0.5 * got.iloc[0]  # the net learns: the errors differ across epochs
    settings = {"loss": cfg.loss, "loss_reduction": cfg.loss_reduction}  # a resolved run's mapping
    pd.testing.assert_series_equal(relative_train_error(history, settings, K), got)


def test_matched_epochs_are_the_first_measured_epochs_below_each_threshold(trained):
    cfg, history, direct = trained
    measured = [0, 2, 3, 5, 6]  # 0: no loss at initialisation, never matched
    errors = sorted(direct[e] for e in measured[1:])
    # thresholds between the measured errors, one above them all and one below them all
    thresholds = [2 * errors[-1], *(math.sqrt(a * b) for a, b in zip(errors, errors[1:])), 0.5 * errors[0]]
    got = matched_epochs(history, measured, cfg, thresholds, num_classes=K)
    assert list(got["threshold"]) == thresholds
    for t, e, err in got.itertuples(index=False):
        below = [m for m in measured[1:] if direct[m] < t]
        if below:
            assert e == below[0] and err == pytest.approx(direct[below[0]], rel=1e-5)
        else:
            assert e is pd.NA and math.isnan(err)
    assert got["epoch"].iloc[-1] is pd.NA and got["epoch"].iloc[0] == 2


def test_the_same_outputs_give_the_same_error_under_every_reduction():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (40,), generator=g)
    Z = torch.randn(40, 5, generator=g, dtype=torch.float64)
    for loss in ("mse", "mse_pm1"):
        errors = []
        for reduction in ("half_sum", "mean"):
            train_loss = float(sample_loss(Z, y, loss, reduction).mean())
            history = pd.DataFrame({"epoch": [1], "train_loss": [train_loss]})
            settings = {"loss": loss, "loss_reduction": reduction}
            errors.append(relative_train_error(history, settings, 5).item())
        T = torch.nn.functional.one_hot(y, 5).double()
        T = 2 * T - 1 if loss == "mse_pm1" else T
        assert errors == pytest.approx([float((Z - T).square().sum() / T.square().sum())] * 2, rel=1e-12)


def test_cross_entropy_is_not_applicable():
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.5, 0.1]})
    assert error_per_loss({"loss": "ce"}, 10) is None
    with pytest.raises(ValueError, match="not applicable to a cross-entropy run"):
        relative_train_error(history, {"loss": "ce"}, 10)
    with pytest.raises(ValueError, match="not applicable"):
        matched_epochs(history, [1, 2], {"loss": "ce"}, num_classes=10)
