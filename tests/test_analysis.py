"""The plain bias-free MLP, the Xavier head init, and the per-layer analysis of a network
(dnc.nets.analysis) against quantities written out in the test; the analysis report and claims."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_metrics_agop import dense
from torch import nn
from torch.func import jacrev, vmap

from dnc.agop import nfa_correlation
from dnc.metrics import layer_metrics
from dnc.nets.analysis import COLUMNS, agop_rows, analyze_network, analyze_splits, network_agops
from dnc.nets.models import build_net
from dnc.nets.train import restore_net, train_network
from dnc.report.analysis import analysis_claims, last_epoch_table, matched_table, render_analysis_section
from dnc.settings import NetConfig

K, D = 3, 6


def blobs(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 2.0 * torch.randn(K, D, generator=g)
    y = torch.arange(K).repeat_interleave(n)
    return (mu[y] + torch.randn(K * n, D, generator=g))[:, None], y  # (N, 1, D)


def plain_net(width=8, layers=3, gain=1.0, seed=0):
    torch.manual_seed(seed)
    return build_net("plain", [1, D], K, width, layers, head_init="xavier", head_init_gain=gain).eval()


def test_plain_arch_is_exactly_the_bias_free_relu_stack():
    net = plain_net(width=8, layers=3)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert isinstance(net.project, nn.Identity)
    assert [tuple(m.weight.shape) for m in linears] == [(8, D), (8, 8), (8, 8), (K, 8)]
    assert all(m.bias is None for m in linears)
    assert sum(p.numel() for p in net.parameters()) == sum(m.weight.numel() for m in linears)
    X, _ = blobs()
    h = X.flatten(1)
    for W in net.head.weights[:-1]:
        h = torch.relu(h @ W.T)
    logits, H1 = net(X)
    torch.testing.assert_close(logits, h @ net.head.weights[-1].T)
    torch.testing.assert_close(H1, X.flatten(1))
    assert net.representations(X)["l1_input"].shape == (len(X), D)


def test_xavier_gain_scales_the_weight_std():
    stds = {}
    for gain in (0.1, 1.0):
        torch.manual_seed(0)
        net = build_net("plain", [1, 300], 10, 200, 2, head_init="xavier", head_init_gain=gain)
        stds[gain] = [float(w.detach().std()) for w in net.head.weights]
    assert stds[0.1] == pytest.approx([0.1 * s for s in stds[1.0]], rel=1e-5)  # same draws, scaled
    expected = [math.sqrt(2 / (300 + 200)), math.sqrt(2 / 400), math.sqrt(2 / 210)]
    assert stds[1.0] == pytest.approx(expected, rel=0.1)
    torch.manual_seed(0)
    dufm = build_net("plain", [1, 300], 10, 200, 2)  # head_init "dufm": N(0, 1/fan_in)
    assert [float(w.detach().std()) for w in dufm.head.weights] == pytest.approx(
        [1 / math.sqrt(300), 1 / math.sqrt(200), 1 / math.sqrt(200)], rel=0.1)


def test_representations_equal_metrics_of_the_layer_written_out():
    net = plain_net()
    X, y = blobs()
    table = analyze_network(net, X, y, "train", step=5)
    assert list(table.columns) == COLUMNS and set(table["step"]) == {5} and set(table["split"]) == {"train"}
    weights = [w.detach().double() for w in net.head.weights]
    phi = X.flatten(1).double()
    for layer, W in enumerate(weights[:-1], start=1):
        H = {"input": phi, "svd": phi @ W.T, "layer": torch.relu(phi @ W.T)}  # U is an isometry
        expected = {rep: layer_metrics(h, y) for rep, h in H.items()}
        for rep, m in expected.items():
            at = table[(table["layer"] == layer) & (table["representation"] == rep)]
            got = at.set_index("metric")["value"]
            for key in ("nc1_trace", "nc1_pinv", "nc2_etf", "nc2_orth"):
                assert got[key] == pytest.approx(m[key], rel=1e-8, abs=1e-12), (layer, rep, key)
            # The AGOP paper's measures from their definitions (dense Sigma_T and K x K Gram).
            ref = dense(H[rep].numpy(), y.numpy())
            for key in ("sigma_w_total", "sigma_b_total", "nc2_agop"):
                assert got[key] == pytest.approx(ref[key], rel=1e-8, abs=1e-14), (layer, rep, key)
        phi = torch.relu(phi @ W.T)
    reps = table.groupby("layer")["representation"].apply(set)
    assert list(reps.index) == [1, 2, 3]
    assert all(r == {"input", "svd", "layer", "agop", "weights"} for r in reps)


def test_agop_of_the_last_relu_layer_matches_per_sample_jacobians_and_the_closed_form():
    net = plain_net(width=8, layers=2)
    X, y = blobs()
    agops = network_agops(net, X, y)
    W1, W2, R = (w.detach().double() for w in net.head.weights)
    phi = torch.relu(X.flatten(1).double() @ W1.T)  # input of layer 2 (the last ReLU layer)
    jac = vmap(jacrev(lambda h: R @ torch.relu(W2 @ h)))(phi)  # (N, K, d): rest = ReLU, then W_L
    by_jacobian = torch.einsum("nkd,nke->de", jac, jac) / len(phi)
    mask = (phi @ W2.T > 0).double()  # D_i
    closed = sum(W2.T @ torch.diag(m) @ R.T @ R @ torch.diag(m) @ W2 for m in mask) / len(phi)
    torch.testing.assert_close(agops[1], by_jacobian, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(agops[1], closed, rtol=1e-6, atol=1e-10)
    full = vmap(jacrev(lambda x: R @ torch.relu(W2 @ torch.relu(W1 @ x))))(X.flatten(1).double())
    torch.testing.assert_close(agops[0], torch.einsum("nkd,nke->de", full, full) / len(X), rtol=1e-6,
                               atol=1e-10)
    table = analyze_network(net, X, y, "train", 0)
    nfa = table[(table["layer"] == 2) & (table["metric"] == "nfa_plain")]["value"].item()
    assert nfa == pytest.approx(nfa_correlation(W2, closed, sqrt=False), rel=1e-9)


def test_agop_rows_are_balanced_and_change_the_agop():
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    assert agop_rows(y, 6).tolist() == [0, 1, 5, 6, 7, 8]
    assert agop_rows(y, 9).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # class 1 runs out; ties by position
    assert agop_rows(y, None).tolist() == list(range(12)) == agop_rows(y, 50).tolist()
    net = plain_net()
    X, y = blobs()
    idx = agop_rows(y, 12)
    assert torch.bincount(y[idx]).tolist() == [4, 4, 4]
    for a, b in zip(network_agops(net, X, y, 12), network_agops(net, X[idx], y[idx])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_both_splits_share_the_train_agop_and_nan_only_where_documented():
    net = plain_net()
    (X, y), (Xt, yt) = blobs(seed=0), blobs(n=10, seed=1)
    with pytest.raises(ValueError, match="AGOP is taken over the training split"):
        analyze_network(net, Xt, yt, "test", 0)
    table = analyze_splits(net, {"train": (X, y), "test": (Xt, yt)}, step=3)
    test_only = table[table["split"] == "test"]
    assert not test_only["metric"].isin(["nfa_sqrt", "nfa_plain"]).any()
    assert table[table["metric"] == "nfa_sqrt"]["split"].eq("train").all()
    nan = table[table["value"].isna()]
    assert nan["metric"].isin(["svd_share", "svd_share_linear"]).all()
    for _, g in nan.groupby(["split", "layer"]):  # NaN share only when the layer does not reduce NC1
        s = table[(table["split"] == g["split"].iloc[0]) & (table["layer"] == g["layer"].iloc[0])
                  & (table["metric"] == "nc1_trace")].set_index("representation")["value"]
        assert s["layer"] >= s["input"]
    agop = network_agops(net, X, y)
    direct = analyze_network(net, Xt, yt, "test", 3, agops=agop)
    pd.testing.assert_frame_equal(direct, test_only.reset_index(drop=True))


def _fake_analysis(run, nfa_first, nfa_last, shares, steps=(0, 10)):
    rows = []
    for step, nfa in zip(steps, (nfa_first, nfa_last)):
        for layer, share in enumerate(shares, start=1):
            nc1 = {"input": 1.0, "svd": 0.5, "layer": 0.4 if share == share else 2.0, "agop": 0.3}
            rows += [(run, layer, rep, "train", step, "nc1_trace", v) for rep, v in nc1.items()]
            rows += [(run, layer, "weights", "train", step, "svd_share", share),
                     (run, layer, "weights", "train", step, "nfa_sqrt", nfa)]
    return pd.DataFrame(rows, columns=["run", *COLUMNS])


def test_claims_and_section_report_what_was_measured():
    ok = _fake_analysis("a", 0.2, 0.9, [0.8, 0.7, float("nan")])
    weak = _fake_analysis("b", 0.6, 0.3, [0.2, 0.9, 0.1])
    svd, nfa = analysis_claims(ok)
    assert svd["code"] == "holds" and nfa["code"] == "holds" and svd["runs"] == ["a"]
    assert "2 of the 2 layers (of 3) that reduce NC1" in svd["evidence"]
    assert "is high (≥ 0.5) in every layer" in nfa["claim"] and "strengthens" not in nfa["claim"]
    assert ("a: mean sqrt-NFA over layers 0.900 at epoch 10, per layer 0.90, 0.90, 0.90 (min 0.90); 0.200 "
            "at epoch 0 (initialisation), per layer 0.20, 0.20, 0.20 (measured change of the mean +0.700)"
            ) == nfa["evidence"]
    svd, nfa = analysis_claims(pd.concat([ok, weak]))
    assert svd["code"] == "partly" and nfa["code"] == "partly" and nfa["runs"] == ["a", "b"]
    assert [c["code"] for c in analysis_claims(weak.assign(value=weak["value"].where(
        weak["metric"] != "nfa_sqrt", 0.1)))][1] == "does_not_hold"
    assert {c["code"] for c in analysis_claims(ok.iloc[:0])} == {"not_tested"}
    t = last_epoch_table(ok, "a")
    assert list(t.columns) == ["layer", "nc1_input", "nc1_svd", "nc1_layer", "nc1_agop", "svd_share",
                               "nfa_sqrt", "sigma_w_total_input", "sigma_b_total_input", "nc2_etf_input",
                               "nc2_agop_input"]
    assert t["sigma_w_total_input"].isna().all()  # tables written before these measures existed
    html = render_analysis_section(pd.concat([ok, weak]))
    assert html.count("<img") == 1 and "<table>" in html and render_analysis_section(ok.iloc[:0]) == ""


def test_nfa_claim_falls_rather_than_rises_and_needs_every_layer_high():
    # The NFA claim is "high in every layer": a fall from initialisation is reported, not judged.
    falling = _fake_analysis("f", 0.95, 0.7, [0.8, 0.7, 0.6])
    assert analysis_claims(falling)[1]["code"] == "holds"
    assert "measured change of the mean -0.250" in analysis_claims(falling)[1]["evidence"]
    one_low = falling.copy()
    one_low.loc[(one_low["metric"] == "nfa_sqrt") & (one_low["layer"] == 2), "value"] = 0.3
    code, evidence = (analysis_claims(one_low)[1][k] for k in ("code", "evidence"))
    assert code == "partly" and "at epoch 10, per layer 0.70, 0.30, 0.70 (min 0.30)" in evidence  # 2 of 3
    one_low.loc[(one_low["metric"] == "nfa_sqrt") & (one_low["layer"] == 3), "value"] = 0.2
    assert analysis_claims(one_low)[1]["code"] == "does_not_hold"  # 1 of 3: not a majority
    late = _fake_analysis("g", 0.9, 0.8, [0.8, 0.7], steps=(1, 11))
    assert "initialisation not measured (epoch 0 not analysed; first epoch 1: mean 0.900)" in \
        analysis_claims(late)[1]["evidence"]


def _with_paper_measures(table):
    """The fake table plus sigma_w_total, sigma_b_total, nc2_etf, nc2_agop of each input, per step."""
    base = table[(table["metric"] == "nc1_trace") & (table["representation"] == "input")]
    values = (("sigma_w_total", 0.3), ("sigma_b_total", 0.6), ("nc2_etf", 0.5), ("nc2_agop", 0.1))
    extra = [base.assign(metric=m, value=v * (1 + base["layer"]) / (1 + base["step"])) for m, v in values]
    return pd.concat([table, *extra], ignore_index=True)


def test_matched_table_picks_the_first_analysed_epoch_below_each_threshold():
    steps = (0, 10, 20, 30)
    a = pd.concat([_fake_analysis("a", 0.5, 0.8, [0.8, 0.7], steps=steps[:2]),
                   _fake_analysis("a", 0.85, 0.9, [0.6, 0.4], steps=steps[2:])], ignore_index=True)
    a = _with_paper_measures(a)
    ce = a.assign(run="c")
    model = a.assign(run="m", node="fc")
    # run a: mse_pm1, half_sum, K = 10, so the relative train error is 2 * train_loss / 10.
    loss = {e: 0.9 * 10 / 2 * 10.0 ** (-e / 10) for e in range(1, 31)}  # relative error 0.9 * 10^(-e/10)
    histories = pd.DataFrame([{"run": r, "epoch": e, "train_loss": v}
                              for r in ("a", "c") for e, v in loss.items()])
    config = pd.DataFrame({"run": ["a", "c"], "loss": ["mse_pm1", "ce"], "loss_reduction": ["half_sum"] * 2})
    metrics = pd.DataFrame({"run": ["a", "c"], "metric": "num_classes", "value": 10.0})
    thresholds = (0.5, 0.05, 1e-3, 1e-4)
    matched, notes = matched_table(pd.concat([a, ce, model]), histories, config, metrics, thresholds)
    # 0.9 * 10^(-e/10) < t first at e > 10 log10(0.9 / t); only epochs 10, 20, 30 are analysed
    # (0 has no loss): 0.5 -> 10 (0.09), 0.05 -> 20 (0.009), 1e-3 -> 30 (9e-4), 1e-4 -> none.
    want = {t: next((e for e in steps[1:] if 0.9 * 10.0 ** (-e / 10) < t), None) for t in thresholds}
    assert want == {0.5: 10, 0.05: 20, 1e-3: 30, 1e-4: None}
    got = matched.groupby("threshold")["epoch"].first().to_dict()
    assert got == {t: e for t, e in want.items() if e is not None} and set(matched["run"]) == {"a"}
    for t, e in got.items():
        at = matched[matched["threshold"] == t].drop(columns=["threshold", "run", "epoch", "rel_train_error"])
        expected = last_epoch_table(a[a["step"] <= e], "a")  # the per-layer rows of that epoch
        pd.testing.assert_frame_equal(at.reset_index(drop=True), expected)
        for key, v in (("sigma_w_total_input", 0.3), ("nc2_agop_input", 0.1)):  # as _with_paper_measures
            assert list(at[key]) == pytest.approx([v * (1 + layer) / (1 + e) for layer in at["layer"]])
        assert list(at["svd_share"]) == ([0.8, 0.7] if e <= 10 else [0.6, 0.4])
        assert matched.loc[matched["threshold"] == t, "rel_train_error"].iloc[0] == pytest.approx(
            0.9 * 10.0 ** (-e / 10), rel=1e-12)
    assert any("c: not applicable (cross-entropy" in n for n in notes)
    assert any(n.startswith("m: no training history") for n in notes)
    never, notes = matched_table(a, histories, config, metrics, (1e-5,))
    assert never.empty and notes == ["a: no analysed epoch below 1e-05 (lowest 0.0009, at epoch 30)"]
    html = render_analysis_section(a, histories, config, metrics)
    assert html.count("<img") == 3 and "relative train error &lt; 0.1" in html and "At matched" in html
    assert render_analysis_section(a).count("<img") == 2  # no histories: no matched part


def test_plain_net_trains_without_decay_and_is_analysed(tmp_path):
    X, y = blobs(n=30)
    cfg = NetConfig(arch="plain", head_layers=2, head_width=16, head_init="xavier", head_init_gain=0.5,
                    loss="mse_pm1", optimizer="adam", lr=1e-2, schedule="constant", epochs=15, batch_size=16,
                    lambda_H1=0.0, lambda_W=0.0, weight_decay=0.0, feature_epochs=(0, 15), device="cpu")
    rows = train_network(cfg, {"train": (X, y), "test": (X, y)}, tmp_path, K, progress=False)
    assert rows[-1]["train_acc"] > 0.9
    net, ck = restore_net(tmp_path / "epoch15.pt")
    assert ck["config"]["head_init"] == "xavier" and net.head.weights[0].shape == (16, D)
    table = analyze_splits(net, {"train": (X, y)}, 15)
    assert np.isfinite(table.loc[table["metric"] == "nfa_sqrt", "value"]).all()
