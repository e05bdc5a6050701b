"""Models, training (determinism, resume after a kill, failures) and the DUFM objective of a net."""

import math

import pandas as pd
import pytest
import torch

from dnc.errors import NonFiniteLossError
from dnc.layout import snapshot_file
from dnc.nets.extract import head_objective, network_features
from dnc.nets.models import build_net
from dnc.nets.train import export_snapshots, load_checkpoint, restore_net, train_network
from dnc.settings import NetConfig


def gaussian_data(K=4, d=6, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 1.5 * torch.randn(K, d, generator=g)
    out = {}
    for split in ("train", "test"):
        y = torch.arange(K).repeat_interleave(n)
        out[split] = ((mu[y] + torch.randn(K * n, d, generator=g))[:, None], y)
    return out


def cfg(**kw):
    base = dict(arch="mlp", mlp_widths=(16,), head_layers=2, head_width=8, lr=0.05, epochs=4,
                batch_size=16, lambda_H1=1e-4, lambda_W=1e-3, feature_epochs=(0, 2, 4), device="cpu")
    base.update(kw)
    return NetConfig(**base)


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 12)), ("resnet20", (3, 8, 8)), ("resnet18", (1, 8, 8))])
def test_representations_follow_the_dufm_layout(arch, shape):
    net = build_net(arch, list(shape), num_classes=5, width=8, head_layers=3, mlp_widths=[10]).eval()
    reps = net.representations(torch.randn(7, *shape))
    assert list(reps) == ["l1_input", "l2_pre", "l2_post", "l3_pre", "l3_post", "l4_pre", "l4_post",
                          "l5_output"]
    assert reps["l1_input"].shape == (7, 8) and reps["l5_output"].shape == (7, 5)
    assert all(lin.bias is None for lin in [*net.head.layers, net.head.classifier])
    torch.testing.assert_close(reps["l3_post"], torch.relu(reps["l3_pre"]))
    torch.testing.assert_close(reps["l3_pre"], reps["l2_post"] @ net.head.weights[1].T)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_is_deterministic_and_resumes_after_a_kill(tmp_path, optimizer):
    data = gaussian_data()
    c = cfg(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2)
    full = train_network(c, data, tmp_path / "a", 4, progress=False)
    killed = train_network(c, data, tmp_path / "b", 4, progress=False, stop_after=2)
    assert len(killed) == 2
    resumed = train_network(c, data, tmp_path / "b", 4, progress=False)
    assert resumed == full  # same numbers, as if never interrupted
    a, _ = restore_net(tmp_path / "a" / "epoch4.pt")
    b, _ = restore_net(tmp_path / "b" / "epoch4.pt")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert (tmp_path / "b" / "epoch0.pt").exists()


def test_resume_refuses_another_config(tmp_path):
    data = gaussian_data()
    train_network(cfg(), data, tmp_path, 4, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="checkpoint of another config"):
        train_network(cfg(lr=0.01), data, tmp_path, 4, progress=False)
    rows = train_network(cfg(lr=0.01), data, tmp_path, 4, progress=False, on_conflict="restart")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_non_finite_loss_is_named(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"run 'boom': non-finite loss .* epoch 1"):
        train_network(cfg(lr=1e12, loss="mse"), gaussian_data(), tmp_path, 4, run="boom", progress=False)


def test_a_diverging_run_stops_with_a_non_finite_row(tmp_path, caplog):
    """on_nonfinite="stop": the run ends at the epoch where the loss became non-finite; only the
    feature epochs before it count as reached; a finite run reaches them all."""
    import re

    from dnc.nets.train import diverged_epoch, reached_epochs

    with caplog.at_level("WARNING", logger="dnc.nets.train"):
        rows = train_network(cfg(lr=1e12, loss="mse", feature_epochs=(0, 1, 3)), gaussian_data(), tmp_path,
                             4, run="boom", progress=False, on_nonfinite="stop")
    assert [r["epoch"] for r in rows] == [1] and not math.isfinite(rows[-1]["train_loss"])
    # The row's lr is the one of the diverging mini-batch b: cosine over 4 epochs of 5 batches.
    b = int(re.search(r"epoch 1, batch (\d+)", caplog.text).group(1))
    assert rows[-1]["lr"] == pytest.approx(1e12 * 0.5 * (1 + math.cos(math.pi * b / 20)), rel=1e-12)
    assert math.isnan(rows[-1]["test_acc"])
    assert diverged_epoch(rows) == 1 and reached_epochs([0, 1, 3], rows) == [0]
    assert not (tmp_path / "last.pt").exists()  # nothing saved of the non-finite parameters
    # One batch per epoch: its loss is finite, the update is not; the epoch's evaluation finds it.
    rows = train_network(cfg(lr=1e6, batch_size=1000, feature_epochs=(0, 1, 3)), gaussian_data(),
                         tmp_path / "full", 4, run="boom", progress=False, on_nonfinite="stop")
    assert [r["epoch"] for r in rows] == [1] and diverged_epoch(rows) == 1
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["epoch0.pt"]  # no epoch 1 snapshot
    fine = train_network(cfg(), gaussian_data(), tmp_path / "fine", 4, progress=False, on_nonfinite="stop")
    assert diverged_epoch(fine) is None and reached_epochs([0, 2, 4], fine) == [0, 2, 4]


def test_training_learns_and_collapses(tmp_path):
    from dnc.metrics import layer_metrics

    data = gaussian_data(n=40)
    c = cfg(epochs=30, lr=0.03, head_width=32, mlp_widths=(32,), feature_epochs=(1, 30))
    rows = train_network(c, data, tmp_path, 4, progress=False)
    assert rows[-1]["train_acc"] > 0.85 and rows[-1]["train_loss"] < 0.25 * rows[0]["train_loss"]
    nc1 = []
    for epoch in (1, 30):
        net, _ = restore_net(tmp_path / f"epoch{epoch}.pt")
        with torch.no_grad():
            last_head = net.representations(data["train"][0])["l3_post"]
        nc1.append(layer_metrics(last_head, data["train"][1])["nc1_pinv"])
    assert nc1[1] < 0.5 * nc1[0]


def test_head_objective_equals_the_objective_written_out_from_the_network():
    data = gaussian_data()
    net = build_net("mlp", [1, 6], 4, 8, 2, [16]).double().eval()
    X, y = data["train"]
    lams = [1e-3, 2e-3, 3e-3]
    with torch.no_grad():
        Z, H1 = net(X.double())  # the network's own forward, independent of dnc.dufm.model
    weights = [w.detach() for w in net.head.weights]
    got = head_objective(H1, y, weights, 4, 1e-3, lams)
    fit = float(((Z - torch.nn.functional.one_hot(y, 4).double()) ** 2).sum()) / (2 * len(y))
    regs = [0.5 * lam * float((w**2).sum()) for lam, w in zip(lams, weights)]
    assert got["fit"] == pytest.approx(fit, rel=1e-12)
    assert got["reg_H1"] == pytest.approx(0.5e-3 * float((H1**2).sum()), rel=1e-12)
    assert got["loss"] == pytest.approx(fit + 0.5e-3 * float((H1**2).sum()) + sum(regs), rel=1e-12)
    cols, pred = network_features(net.float(), X)
    assert [c.weight for c, _ in cols] == [1, None, 2, None, 3, None] and pred.shape == (80,)


def test_snapshots_are_exported_and_missing_epochs_named(tmp_path):
    train_network(cfg(), gaussian_data(), tmp_path / "resume", 4, progress=False)
    export_snapshots(tmp_path / "resume", tmp_path / "snap", [0, 2, 4])
    assert sorted(f.name for f in (tmp_path / "snap").iterdir()) == ["epoch0.pt", "epoch2.pt", "epoch4.pt"]
    net, ck = restore_net(snapshot_file(tmp_path / "snap", 2))
    assert ck["epoch"] == 2
    with pytest.raises(FileNotFoundError, match="feature epoch 3"):
        export_snapshots(tmp_path / "resume", tmp_path / "snap2", [3])


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_checkpoint_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": _Payload()}, path)
    with pytest.raises(ValueError, match="evil.pt: refused to load"):
        load_checkpoint(path)


def test_mlp_dufm_head_draws_are_unchanged():
    """arch mlp with head_init dufm draws exactly what the DUFM-head network always drew."""
    from torch import nn

    from dnc.nets.models import MLP

    torch.manual_seed(7)
    net = build_net("mlp", [1, 12], 5, 8, 2, [16, 10])
    torch.manual_seed(7)
    old = [MLP(12, [16, 10], 8).net]
    lins = [nn.Linear(8, 8, bias=False) for _ in range(2)] + [nn.Linear(8, 5, bias=False)]
    for lin in lins:
        nn.init.normal_(lin.weight, std=1.0 / math.sqrt(8))
    expected = [p for m in old for p in m.parameters()] + [lin.weight for lin in lins]
    assert len(list(net.parameters())) == len(expected)
    for p, q in zip(net.parameters(), expected):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_old_checkpoints_without_head_init_restore_with_the_defaults(tmp_path):
    train_network(cfg(epochs=1, feature_epochs=(1,)), gaussian_data(), tmp_path, 4, progress=False)
    ck = load_checkpoint(tmp_path / "epoch1.pt")
    for key in ("head_init", "head_init_gain"):
        del ck["config"][key]
    torch.save(ck, tmp_path / "old.pt")
    old, _ = restore_net(tmp_path / "old.pt")
    new, _ = restore_net(tmp_path / "epoch1.pt")
    for p, q in zip(old.parameters(), new.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("lam_H1,lam_W", [(0.0, 5e-3), (5e-3, 0.0), (5e-3, [5e-3, 0.0])])  # L = 2
def test_a_zero_penalty_has_no_dufm_theory(tmp_path, lam_H1, lam_W):
    from conftest import dnc_head_tables

    from dnc.nets.compare import COMPARISON_COLUMNS, compare_network, head_settings
    from dnc.theory import dnc_optimum

    K, n, lam = 3, 10, 5e-3
    objective, metrics, weights = dnc_head_tables(tmp_path, K, n, lam,
                                                  dnc_optimum(K, 2, n, lam, lam).mean_norms)
    measured = (objective, metrics, weights)
    normal_c, normal_v = compare_network("net", head_settings(K, K * n, 1, lam, lam), *measured)
    comparison, verdict = compare_network("net", head_settings(K, K * n, 1, lam_H1, lam_W), *measured)
    assert comparison.empty and list(comparison.columns) == list(normal_c.columns) == COMPARISON_COLUMNS
    assert list(verdict.columns) == list(normal_v.columns) and len(verdict) == 1
    v = verdict.iloc[0]
    assert v["verdict"] == "no_theory" and not v["recovered_dufm_optimum"]
    assert "no DUFM theory" in v["verdict_text"] and "closed-form" in v["verdict_text"]
    assert math.isnan(v["L_DNC"]) and math.isnan(v["rel_gap"]) and v["epoch"] == 7
    assert v["final_loss"] == pytest.approx(objective["loss"].iloc[-1]) and v["min_hidden_rank"] == K
    assert pd.concat([normal_v, verdict])["verdict"].tolist() == [normal_v["verdict"].iloc[0], "no_theory"]


@pytest.mark.parametrize("scale,recovered", [(1.0, True), (1.1, True), (1.15, False)])
def test_a_binary_head_is_recovered_only_within_one_percent_of_L_DNC(tmp_path, scale, recovered):
    from conftest import dnc_construction, state_head_tables

    from dnc.nets.compare import compare_network, head_settings
    from dnc.theory import dnc_optimum

    K, L, n, lam = 2, 4, 10, 5e-3
    opt = dnc_optimum(K, L, n, lam, lam)
    state = dnc_construction(K, L, n, 6, list(opt.mean_norms))
    # H_1 -> s H_1, W_1 -> W_1 / s: the same function, penalties s^2 K tau and K tau / s^2 instead
    # of K tau each (halved in the objective); the geometry is untouched.
    state.H1, state.W[0] = scale * state.H1, state.W[0] / scale
    expected = opt.loss + opt.penalty / 2 * (scale**2 + scale**-2 - 2)
    tables = state_head_tables(tmp_path / "s.parquet", state, K, lam)
    settings = head_settings(K, K * n, L - 1, lam, lam)
    # Penalties and norms off by up to 32 % pass structure_rtol = 1: only the loss target decides.
    _, verdict = compare_network("net", settings, *tables, tolerances={"structure_rtol": 1.0})
    v = verdict.iloc[0]
    assert v["final_loss"] == pytest.approx(expected, rel=1e-10)
    assert v["rel_gap"] == pytest.approx(expected / opt.loss - 1, abs=1e-10)
    assert (abs(v["rel_gap"]) <= 0.01) == recovered  # 1.1: +0.7 %, 1.15: +1.6 %
    assert v["dnc_geometry"] and v["geometry_failed"] == 0 and v["structure_failed"] == 0
    assert v["recovered_dufm_optimum"] == recovered
    assert v["verdict_text"] == (
        f"{'recovered' if recovered else 'did not recover'} DUFM-optimal features: objective "
        f"{v['rel_gap']:+.1%} vs L_DNC, DNC geometry at every head layer, 0 of "
        f"{v['structure_checks']} layer checks fail")
    _, loose = compare_network("net", settings, *tables,
                               tolerances={"structure_rtol": 1.0, "loss_rtol": 0.1})
    assert loose.iloc[0]["recovered_dufm_optimum"]
    # With the default structure tolerance (10 %) the unbalanced penalties fail on their own.
    _, default = compare_network("net", settings, *tables)
    assert (default.iloc[0]["structure_failed"] > 0) == (scale > 1)


def test_a_head_layer_off_the_dnc_geometry_is_named(tmp_path):
    from conftest import dnc_head_tables

    from dnc.nets.compare import compare_network, head_settings
    from dnc.theory import dnc_optimum

    K, L, n, lam = 2, 3, 10, 5e-3
    norms = dnc_optimum(K, L, n, lam, lam).mean_norms
    objective, metrics, weights = dnc_head_tables(tmp_path, K, n, lam, norms)
    bent = metrics.copy()
    at = (bent["layer"] == 3) & (bent["representation"] == "post") & (bent["metric"] == "nc2_orth")
    assert at.sum() == 1
    bent.loc[at, "value"] = 0.3  # class means of layer 3 far from orthogonal
    _, verdict = compare_network("net", head_settings(K, K * n, L - 1, lam, lam), objective, bent, weights)
    v = verdict.iloc[0]
    assert abs(v["rel_gap"]) < 1e-12 and not v["dnc_geometry"] and v["geometry_failed"] == 1
    assert not v["recovered_dufm_optimum"]
    assert "DNC geometry fails: nc2_orth at layer 3 post, 1 of" in v["verdict_text"]


def test_a_ten_class_head_is_compared_with_L_tri_and_its_ranks(tmp_path):
    from conftest import dnc_construction, state_head_tables

    from dnc.dufm.model import DUFMState
    from dnc.nets.compare import compare_network, head_settings
    from dnc.report.networks import hidden_ranks
    from dnc.theory import dnc_optimum, triangle_optimum

    # The reference point of docs/theory.md section 4: L_DNC = 0.13640, L_tri = 0.111652.
    r, K, L, n, lam = 5, 10, 4, 5, 4e-3
    settings = head_settings(K, K * n, L - 1, lam, lam)
    opt = dnc_optimum(K, L, n, lam, lam)
    dnc = dnc_construction(K, L, n, 12, list(opt.mean_norms))
    _, verdict = compare_network("net", settings, *state_head_tables(tmp_path / "s.parquet", dnc, K, lam))
    v = verdict.iloc[0]
    assert v["recovered_dufm_optimum"] and v["dnc_geometry"]
    assert v["loss_over_L_tri"] == pytest.approx(0.13640 / 0.111652, rel=1e-4)
    assert v["verdict_text"].endswith(
        f"; objective {v['loss_over_L_tri']:.4f} L_tri (L_tri = {0.111652 / 0.13640:.4f} L_DNC), "
        f"smallest class-mean rank 10 of K = 10 at layer 3 (pre)")

    tri = triangle_optimum(r, L, n, lam, lam)
    state = DUFMState(H1=torch.tensor(tri.H1), W=[torch.tensor(W) for W in tri.W])
    objective, metrics, weights = state_head_tables(tmp_path / "s.parquet", state, K, lam)
    _, verdict = compare_network("net", settings, objective, metrics, weights)
    v = verdict.iloc[0]
    assert v["final_loss"] == pytest.approx(0.111652, rel=1e-5) and v["verdict"] == "below_dnc_low_rank"
    assert not v["recovered_dufm_optimum"] and not v["dnc_geometry"]
    assert v["verdict_text"].startswith(f"did not recover DUFM-optimal features: objective "
                                        f"{0.111652 / 0.13640 - 1:+.1%} vs L_DNC, DNC geometry fails: ")
    assert v["verdict_text"].endswith("; objective 1.0000 L_tri (L_tri = 0.8186 L_DNC), smallest "
                                      "class-mean rank 5 of K = 10 at layer 3 (pre)")
    # Pre-activations have rank r at every hidden layer; after the last ReLU the rank is K.
    assert hidden_ranks(metrics) == "l2 5/5, l3 5/5, l4 5/10"
