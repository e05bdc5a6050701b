"""AGOP of networks, NFA correlation and the SVD split of a bias-free layer (docs/agop.md)."""

from __future__ import annotations

import math

import pytest
import torch
from test_metrics_agop import dense
from torch import nn
from torch.func import jacrev, vmap

from dnc.agop import (
    SPLIT_METRICS,
    layer_agops,
    layer_split_metrics,
    network_agop,
    nfa_correlation,
    psd_sqrt,
    rest_of_network,
    stack_split_metrics,
    svd_share,
    svd_split,
)
from dnc.layout import ANALYSIS_REPRESENTATIONS
from dnc.metrics import layer_metrics

PAPER_MEASURES = ("sigma_w_total", "sigma_b_total", "nc2_agop")


def small_mlp(d: int = 7, width: int = 11, K: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, K))


def jacrev_agop(f, X: torch.Tensor) -> torch.Tensor:
    """Reference: one (K, d) Jacobian per sample, then the float64 mean of J^T J."""
    J = vmap(jacrev(lambda x: f(x[None])[0]))(X).to(torch.float64)  # (n, K, d)
    return torch.einsum("nkd,nke->de", J, J) / X.shape[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_per_sample_jacobians(dtype):
    net = small_mlp().to(dtype)
    X = torch.randn(37, 7, dtype=dtype, generator=torch.Generator().manual_seed(1))
    G = network_agop(net, X, batch_size=10)  # 4 batches, the last one partial
    assert G.dtype == torch.float64 and G.shape == (7, 7)
    assert rel_err(G, jacrev_agop(net, X)) < 1e-6
    assert torch.allclose(G, G.T)


def test_linear_map_gives_AtA():
    A = torch.randn(5, 9, dtype=torch.float64)
    X = torch.randn(13, 9, dtype=torch.float64)
    G = network_agop(lambda x: x @ A.T, X, batch_size=4)
    torch.testing.assert_close(G, A.T @ A, rtol=1e-12, atol=1e-12)


def test_no_grad_and_mode_restored():
    net = small_mlp()
    net.train()
    X = torch.randn(20, 7)
    with torch.no_grad():  # callers often hold no_grad: the AGOP still needs autograd
        G = network_agop(net, X, batch_size=8)
    assert G.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    assert net.training
    net.eval()
    network_agop(net, X)
    assert not net.training


def test_nfa_correlation_of_linear_layer_is_one():
    W = torch.randn(6, 8, dtype=torch.float64)
    X = torch.randn(30, 8, dtype=torch.float64)
    G = network_agop(lambda x: x @ W.T, X)
    assert nfa_correlation(W, G, sqrt=False) == pytest.approx(1.0, abs=1e-12)
    assert -1.0 <= nfa_correlation(W, G, sqrt=True) <= 1.0


def clustered(N_per: int = 20, K: int = 3, d: int = 6, spread: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, d, generator=g, dtype=torch.float64)
    labels = torch.arange(K).repeat_interleave(N_per)
    Phi = means[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    return Phi, labels


def test_svd_split_representations():
    Phi, y = clustered()
    W = torch.randn(4, 6, dtype=torch.float64)
    reps = svd_split(W, Phi, agop=W.T @ W)
    assert tuple(reps) == ANALYSIS_REPRESENTATIONS  # the analysis table's names, in its order
    assert reps["svd"].shape == (60, 4)
    torch.testing.assert_close(reps["layer"], torch.relu(Phi @ W.T))
    torch.testing.assert_close(reps["input"], Phi)
    torch.testing.assert_close(reps["agop"], Phi @ psd_sqrt(W.T @ W))
    lin, proj = layer_metrics(Phi @ W.T, y), layer_metrics(reps["svd"], y)
    for key in ("nc1_trace", "nc1_pinv"):
        assert proj[key] == pytest.approx(lin[key], rel=1e-9)


def test_layer_split_metrics_row():
    Phi, y = clustered()
    W = torch.randn(8, 6, dtype=torch.float64)
    split = layer_split_metrics(Phi, W, y, agop=W.T @ W)
    row = split.row()
    reps = svd_split(W, Phi, W.T @ W)
    for rep in ANALYSIS_REPRESENTATIONS:
        assert list(split.metrics[rep]) == list(SPLIT_METRICS)
        assert split.metrics[rep] == {k: layer_metrics(reps[rep], y)[k] for k in SPLIT_METRICS}
        # The AGOP paper's measures against their definitions, written out densely (Sigma_T from the
        # rows, the K x K Gram of the normalised centred means).
        ref = dense(reps[rep].numpy(), y.numpy())
        for key in PAPER_MEASURES:
            assert row[f"{key}_{rep}"] == pytest.approx(ref[key], rel=1e-10, abs=1e-15), (rep, key)
        for key in ("nc1_pinv", "nc1_trace", "nc2_etf", "nc2_orth"):
            assert f"{key}_{rep}" in row
    # The total scatter splits into within and between (balanced classes), and their ratio is NC1.
    for rep in ANALYSIS_REPRESENTATIONS:
        m = split.metrics[rep]
        assert m["sigma_w_total"] + m["sigma_b_total"] == pytest.approx(1.0, rel=1e-12)
        assert m["sigma_w_total"] / m["sigma_b_total"] == pytest.approx(m["nc1_trace"], rel=1e-10)
    assert row["nfa_plain"] == pytest.approx(1.0) and row["share_nc1"] == 1.0
    a, p, l = (row[f"nc1_trace_{r}"] for r in ("input", "svd", "layer"))
    assert row["svd_share"] == pytest.approx(svd_share(a, p, l), nan_ok=True)
    assert row["svd_share_linear"] == pytest.approx(svd_share(a, p, l, log=False), nan_ok=True)
    torch.testing.assert_close(split.output, torch.relu(Phi @ W.T))
    assert "nfa_sqrt" not in layer_split_metrics(Phi, W, y).scalars
    assert "nfa_sqrt" not in layer_split_metrics(Phi, W, y, agop=W.T @ W, nfa=False).scalars
    pinv = layer_split_metrics(Phi, W, y, nc1_key="nc1_pinv")
    a, p, l = (pinv.metrics[r]["nc1_pinv"] for r in ("input", "svd", "layer"))
    assert pinv.scalars["svd_share"] == pytest.approx(svd_share(a, p, l), nan_ok=True)
    assert pinv.row()["share_nc1"] == 0.0


def test_stack_split_feeds_each_layer_the_previous_output():
    Phi, y = clustered()
    weights = [torch.randn(8, 6, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)]
    agops = [torch.eye(6, dtype=torch.float64), torch.eye(8, dtype=torch.float64)]
    first, second = stack_split_metrics(Phi, weights, y, agops)
    h1 = torch.relu(Phi @ weights[0].T)
    assert second.metrics == layer_split_metrics(h1, weights[1], y, agops[1]).metrics
    assert first.metrics == layer_split_metrics(Phi, weights[0], y, agops[0]).metrics
    scalars = {"svd_share", "svd_share_linear", "nfa_sqrt", "nfa_plain"}
    assert set(first.scalars) == set(second.scalars) == scalars
    with pytest.raises(ValueError, match="2 AGOPs for 1 layers"):
        stack_split_metrics(Phi, weights[:1], y, agops)


def test_svd_share():
    assert svd_share(4.0, 2.0, 1.0) == pytest.approx(0.5)
    assert svd_share(4.0, 2.0, 1.0, log=False) == pytest.approx(2 / 3)
    assert svd_share(4.0, 1.0, 2.0) == pytest.approx(2.0)  # the ReLU undoes half the projection's gain
    assert math.isnan(svd_share(1.0, 0.5, 2.0))  # NC1 rises through the layer
    assert math.isnan(svd_share(1.0, 0.5, 1.0, log=False))
    assert math.isnan(svd_share(1.0, 0.0, 0.5))  # log of 0


def test_svd_share_nan_when_layer_raises_nc1():
    Phi, y = clustered(spread=0.1)
    # The layer keeps only a within-class noise direction: NC1 rises, the share is undefined.
    Phi = torch.cat([Phi, torch.randn(len(y), 1, dtype=torch.float64)], dim=1)
    W = torch.zeros(1, 7, dtype=torch.float64)
    W[0, 6] = 1.0
    row = layer_split_metrics(Phi, W, y).row()
    assert row["nc1_trace_layer"] > row["nc1_trace_input"]
    assert math.isnan(row["svd_share"]) and math.isnan(row["svd_share_linear"])


def test_layer_agops_match_module():
    torch.manual_seed(0)
    weights = [0.5 * torch.randn(9, 5, dtype=torch.float64), 0.5 * torch.randn(8, 9, dtype=torch.float64)]
    readout = torch.randn(3, 8, dtype=torch.float64)
    X = torch.randn(25, 5, dtype=torch.float64)
    phis, agops = layer_agops(weights, readout, X, batch_size=7)
    assert [p.shape for p in phis] == [(25, 5), (25, 9)]
    torch.testing.assert_close(phis[1], torch.relu(X @ weights[0].T))
    net = nn.Sequential(nn.Linear(5, 9, bias=False), nn.ReLU(), nn.Linear(9, 8, bias=False), nn.ReLU(),
                        nn.Linear(8, 3, bias=False)).double()
    with torch.no_grad():
        for lin, w in zip([net[0], net[2], net[4]], [*weights, readout]):
            lin.weight.copy_(w)
    assert rel_err(agops[0], jacrev_agop(net, X)) < 1e-10
    assert rel_err(agops[1], jacrev_agop(rest_of_network(weights, readout, 1), phis[1])) < 1e-10
    # The last layer's AGOP through one ReLU and a linear readout, by hand.
    h = phis[1] @ weights[1].T
    G = sum(((h[i] > 0) * readout).T @ ((h[i] > 0) * readout) for i in range(25)) @ weights[1] / 25
    assert rel_err(agops[1], weights[1].T @ G) < 1e-10
    net_params = [w.requires_grad_(True) for w in weights]
    layer_agops(net_params, readout, X)
    assert all(w.grad is None for w in net_params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    net = small_mlp()
    X = torch.randn(50, 7)
    G_cpu = network_agop(net, X, batch_size=16)
    G_gpu = network_agop(net.cuda(), X.cuda(), batch_size=16)
    assert G_gpu.device.type == "cuda" and G_gpu.dtype == torch.float64
    assert rel_err(G_gpu.cpu(), G_cpu) < 1e-5


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the entries of two matrices, written out (not nfa_correlation)."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("d_in, d_out", [(64, 128), (128, 128), (512, 512), (512, 128), (128, 512)])
def test_random_gram_correlates_with_the_identity_as_derived(d_in, d_out):
    # docs/agop.md "The NFA at initialisation": for W with i.i.d. entries,
    # corr(vec W^T W, vec I) -> (1 + d_in / d_out)^(-1/2); the scale of W does not matter.
    g = torch.Generator().manual_seed(d_in + d_out)
    eye = torch.eye(d_in, dtype=torch.float64)
    got = [_corr(W.T @ W, eye) for W in (s * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
                                         for s in (1.0, 0.1, 3.0))]
    assert sum(got) / len(got) == pytest.approx((1 + d_in / d_out) ** -0.5, abs=0.015)


def test_nfa_of_a_random_relu_net_between_the_identity_and_the_gram_root():
    # The digits network's shape (64 -> 5 x 128 -> 10) with Gaussian weights: AGOP_l = W_l^T B_l W_l,
    # so the NFA lies between corr(W^T W, I) (B_l far from a multiple of I) and
    # corr(W^T W, (W^T W)^{1/2}) (B_l = c I), and well above the former away from the readout.
    g = torch.Generator().manual_seed(0)
    widths, K = [64, 128, 128, 128, 128, 128], 10
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64) for i, o in zip(widths, widths[1:])]
    readout = torch.randn(K, widths[-1], generator=g, dtype=torch.float64)
    _, agops = layer_agops(weights, readout, torch.randn(500, widths[0], generator=g, dtype=torch.float64))
    nfa = [nfa_correlation(W, A) for W, A in zip(weights, agops)]
    floor = [(1 + W.shape[1] / W.shape[0]) ** -0.5 for W in weights]
    roots = [_corr(W.T @ W, psd_sqrt(W.T @ W)) for W in weights]
    for l, (n, lo, hi) in enumerate(zip(nfa, floor, roots), start=1):
        assert lo - 0.03 < n < hi, (l, n, lo, hi)
    assert nfa[0] > floor[0] + 0.05 and nfa[1] > floor[1] + 0.05
    assert nfa == sorted(nfa, reverse=True)  # closer to the identity's floor near the readout
