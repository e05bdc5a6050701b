"""The AGOP paper's recipe options on the model side: per-layer head init (layer_init), the ResNet-18
as its authors trained it (resnet18_imagenet), and the split input of the SVD analysis (post / pre)
against forward passes written out in the test."""

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from dnc.agop import layer_split_metrics, nfa_correlation, psd_sqrt, stack_split_metrics
from dnc.metrics import layer_metrics
from dnc.nets.analysis import analyze_network
from dnc.nets.models import build_net

K, D = 3, 6
SIGMAS = 6.0  # tolerance of every statistical check, in standard errors of the estimate


def uniform_bound(kind: str, gain: float, fan_in: int, fan_out: int) -> float:
    """b of U(-b, b), from the definitions (PyTorch's nn.Linear, Glorot & Bengio, He et al.)."""
    return {"default": 1 / math.sqrt(fan_in),
            "xavier_uniform": gain * math.sqrt(6 / (fan_in + fan_out)),
            "kaiming_uniform": gain * math.sqrt(6 / fan_in)}[kind]


def normal_std(kind: str, gain: float, fan_in: int, fan_out: int) -> float:
    return {"dufm": gain / math.sqrt(fan_in),
            "xavier_normal": gain * math.sqrt(2 / (fan_in + fan_out)),
            "kaiming_normal": gain * math.sqrt(2 / fan_in)}[kind]


def assert_uniform(w: torch.Tensor, b: float) -> None:
    """w's entries look like i.i.d. U(-b, b): within the bound, reaching it, mean 0, variance b^2/3."""
    x, n = w.detach().double().flatten(), w.numel()
    assert x.abs().max() <= b * (1 + 1e-6)
    assert x.abs().max() >= b * (1 - 20 / n)  # P(max < b (1 - 20/n)) = (1 - 20/n)^n < e^-20
    assert abs(float(x.mean())) <= SIGMAS * b / math.sqrt(3 * n)
    # var of the sample variance of U(-b, b): (mu_4 - sigma^4) / n = (b^4/5 - b^4/9) / n
    assert float(x.var()) == pytest.approx(b * b / 3, abs=SIGMAS * b * b * math.sqrt(4 / (45 * n)))


def assert_normal(w: torch.Tensor, s: float) -> None:
    """w's entries look like i.i.d. N(0, s^2): mean 0, variance s^2, and the normal's mass beyond 2s
    (4.55 %; a uniform of the same variance has none)."""
    x, n = w.detach().double().flatten(), w.numel()
    assert abs(float(x.mean())) <= SIGMAS * s / math.sqrt(n)
    assert float(x.var()) == pytest.approx(s * s, abs=SIGMAS * s * s * math.sqrt(2 / n))
    p = math.erfc(2 / math.sqrt(2))
    tail = float((x.abs() > 2 * s).double().mean())
    assert tail == pytest.approx(p, abs=SIGMAS * math.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("kind, gain", [("default", 1.0), ("dufm", 1.0), ("dufm", 0.5),
                                        ("xavier_uniform", 0.1), ("xavier_normal", 0.1),
                                        ("kaiming_uniform", 1.0), ("kaiming_normal", 0.3)])
def test_layer_init_draws_each_layer_from_its_distribution(kind, gain):
    spec = kind if kind == "default" else f"{kind}:{gain}"
    torch.manual_seed(0)
    # head_init "xavier" with gain 5 would be far off every checked distribution: layer_init wins.
    net = build_net("plain", [1, 300], 10, 200, 2, head_init="xavier", head_init_gain=5.0,
                    layer_init=[spec] * 3)
    for w in net.head.weights:  # (200, 300), (200, 200), (10, 200)
        fan_out, fan_in = w.shape
        if kind in ("default", "xavier_uniform", "kaiming_uniform"):
            assert_uniform(w, uniform_bound(kind, gain, fan_in, fan_out))
        else:
            assert_normal(w, normal_std(kind, gain, fan_in, fan_out))


def test_the_authors_mlp_init_per_layer_and_a_wrong_layer_count():
    torch.manual_seed(1)
    spec = ["xavier_uniform:0.1"] * 5 + ["default"]  # nc_nn.py: hidden xavier_uniform_ 0.1, readout as built
    net = build_net("plain", [1, 784], 10, 512, 5, layer_init=spec)
    weights = net.head.weights
    assert [tuple(w.shape) for w in weights] == [(512, 784)] + [(512, 512)] * 4 + [(10, 512)]
    for w in weights[:-1]:
        assert_uniform(w, 0.1 * math.sqrt(6 / (w.shape[0] + w.shape[1])))
    assert_uniform(weights[-1], 1 / math.sqrt(512))
    with pytest.raises(ValueError, match="one entry per weight layer W_1 .. W_6"):
        build_net("plain", [1, 784], 10, 512, 5, layer_init=spec[:-1])
    with pytest.raises(ValueError, match="unknown kind"):
        build_net("plain", [1, 8], 10, 4, 1, layer_init=["xavier:0.1", "default"])


def test_resnet18_imagenet_keeps_the_7x7_stride_2_stem_and_max_pool():
    torch.manual_seed(0)
    spec = ["xavier_uniform:0.05"] * 2 + ["xavier_uniform:0.25"] * 3 + ["default"]
    net = build_net("resnet18_imagenet", [3, 32, 32], 10, 512, 5, layer_init=spec).eval()
    conv1 = net.backbone.conv1
    assert (conv1.in_channels, conv1.out_channels) == (3, 64)
    assert conv1.kernel_size == (7, 7) and conv1.stride == (2, 2) and conv1.padding == (3, 3)
    # A fresh nn.Conv2d as in the authors' code: PyTorch's default U(+-1/sqrt(fan_in)), fan_in = 3 * 49
    # (torchvision's own kaiming_normal_ fan_out draws would exceed this bound about 9 times).
    assert float(conv1.weight.detach().abs().max()) <= 1 / math.sqrt(3 * 49)
    assert isinstance(net.backbone.maxpool, nn.MaxPool2d) and isinstance(net.backbone.fc, nn.Identity)
    assert isinstance(net.project, nn.Identity)  # 512-d backbone output = head width: no projection
    seen = {}
    net.backbone.maxpool.register_forward_hook(lambda m, i, o: seen.update(pool=o.shape))  # returns None
    X = torch.randn(4, 3, 32, 32)
    logits, H1 = net(X)
    assert seen["pool"] == (4, 64, 8, 8)  # 32 -> 16 (stride-2 conv) -> 8 (max-pool)
    assert H1.shape == (4, 512) and logits.shape == (4, 10)
    for w, gain in zip(net.head.weights[:5], (0.05, 0.05, 0.25, 0.25, 0.25)):
        assert float(w.detach().abs().max()) <= gain * math.sqrt(6 / 1024) * (1 + 1e-6)
    small = build_net("resnet18", [3, 32, 32], 10, 512, 5)
    assert small.backbone.conv1.kernel_size == (3, 3) and isinstance(small.backbone.maxpool, nn.Identity)
    gray = build_net("resnet18_imagenet", [1, 28, 28], 10, 64, 2).eval()
    assert gray.backbone.conv1.in_channels == 1 and isinstance(gray.project, nn.Linear)
    assert gray.features(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def blobs(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 2.0 * torch.randn(K, D, generator=g)
    y = torch.arange(K).repeat_interleave(n)
    return (mu[y] + torch.randn(K * n, D, generator=g))[:, None], y  # (N, 1, D)


def written_out(net, X):
    """The bias-free stack by hand: post-activation inputs h_0 = X, h_l = ReLU(z_l), z_l = h_{l-1} W_l^T,
    and each hidden layer's AGOP over its input, from per-sample Jacobians of the rest of the net."""
    *Ws, R = (w.detach().double() for w in net.head.weights)
    post, pre = [X.flatten(1).double()], []
    for W in Ws:
        pre.append(post[-1] @ W.T)
        post.append(torch.relu(pre[-1]))

    def rest(l):
        def f(h):
            for W in Ws[l:]:
                h = torch.relu(W @ h)
            return R @ h
        return f

    agops = []
    for l in range(len(Ws)):
        jac = vmap(jacrev(rest(l)))(post[l])  # (N, K, d_l)
        agops.append(torch.einsum("nkd,nke->de", jac, jac) / len(X))
    return Ws, post[:-1], pre, agops


@pytest.mark.parametrize("split_input", ["post", "pre"])
def test_the_split_takes_the_input_or_the_previous_pre_activation(split_input):
    torch.manual_seed(0)
    net = build_net("plain", [1, D], K, 8, 3, layer_init=["xavier_normal:1.0"] * 4).eval()
    X, y = blobs()
    Ws, post, pre, agops = written_out(net, X)
    # Layer 1 has no previous layer: its Phi is H_1 = X either way, as the authors' identity map.
    phis = post if split_input == "post" else [post[0], *pre[:-1]]
    splits = stack_split_metrics(post[0], Ws, y, agops, split_input=split_input)
    table = analyze_network(net, X, y, "train", 0, split_input=split_input)
    for l, (W, phi, agop) in enumerate(zip(Ws, phis, agops)):
        expected = {"input": phi, "svd": phi @ W.T, "layer": torch.relu(phi @ W.T),  # U is an isometry
                    "agop": phi @ psd_sqrt(agop)}
        at = table[table["layer"] == l + 1]
        for rep, H in expected.items():
            m = layer_metrics(H, y)
            got = at[at["representation"] == rep].set_index("metric")["value"]
            for key in ("nc1_trace", "nc1_pinv", "nc2_etf", "nc2_orth"):
                assert splits[l].metrics[rep][key] == pytest.approx(m[key], rel=1e-7, abs=1e-12), (l, rep)
                assert got[key] == pytest.approx(m[key], rel=1e-7, abs=1e-12), (l, rep, key)
        # The AGOP and the NFA are those of the layer's own (post-activation) input in both modes.
        nfa = at[at["metric"] == "nfa_sqrt"]["value"].item()
        assert nfa == pytest.approx(nfa_correlation(W, agop), rel=1e-6)
    if split_input == "pre":  # the option changes what layers 2.. measure
        assert splits[1].metrics != layer_split_metrics(post[1], Ws[1], y, agops[1]).metrics


def test_post_is_the_default_and_unchanged_with_a_bias():
    torch.manual_seed(2)
    net = build_net("plain", [1, D], K, 8, 3, head_init="xavier", head_init_gain=0.5).eval()
    X, y = blobs()
    default = analyze_network(net, X, y, "train", 4)
    pd.testing.assert_frame_equal(default, analyze_network(net, X, y, "train", 4, split_input="post"))
    assert not default.equals(analyze_network(net, X, y, "train", 4, split_input="pre"))
    # With biases, "pre" is Phi W^T + b of the previous layer and the stack still runs on ReLU of it.
    Ws = [torch.randn(8, D, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)]
    bs = [torch.randn(8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    phi = X.flatten(1).double()
    first, second = stack_split_metrics(phi, Ws, y, biases=bs, split_input="pre")
    z1 = phi @ Ws[0].T + bs[0]
    assert second.metrics == layer_split_metrics(z1, Ws[1], y, bias=bs[1]).metrics
    assert first.metrics == layer_split_metrics(phi, Ws[0], y, bias=bs[0]).metrics
    with pytest.raises(ValueError, match="split_input must be 'post' or 'pre'"):
        stack_split_metrics(phi, Ws, y, split_input="mid")
