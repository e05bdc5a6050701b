"""MLP heads of models trained elsewhere (dnc.models.analysis): the chain is found on the fx graph,
the analysis equals the bias-free stack's with zero biases and a float64 numpy reference with them,
the table has the network analysis schema plus node, and analyze_model runs on a written checkpoint."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnc.agop import stack_split_metrics
from dnc.metrics import layer_metrics
from dnc.models.analysis import (
    MODEL_COLUMNS,
    analyze_head,
    analyze_head_splits,
    analyze_model,
    empty_model_analysis,
    find_mlp_head,
    head_input,
)
from dnc.nets.analysis import empty_analysis

K, D = 3, 12


class HeadNet(nn.Module):
    """A small model: Linear-ReLU on 12-d inputs, then a head Linear-ReLU-Linear-ReLU-Linear with
    biases (torch.relu and F.relu calls and an nn.ReLU, a Dropout in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 16), nn.Tanh())
        self.fc1 = nn.Linear(16, 10)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(10, 8)
        self.fc3 = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.fc1(self.body(x))))
        return self.fc3(F.relu(self.fc2(h)))


class NormNet(nn.Module):
    """Last Linears separated by a LayerNorm: no head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(D, 10), nn.LayerNorm(10), nn.Linear(10, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


class ResidualNet(nn.Module):
    """Last Linears separated by a residual add: no head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h)) + h)


def _data(n: int = 90, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    X = torch.randn(n, D, generator=g) + 2.0 * F.one_hot(y, D).float()
    return X, y


def _model(seed: int = 0) -> HeadNet:
    torch.manual_seed(seed)
    return HeadNet().eval()


def test_chain_found_on_the_graph():
    assert find_mlp_head(_model()) == ["fc1", "fc2", "fc3"]
    assert find_mlp_head(NormNet()) is None
    # fc3's input is an add (a residual): the chain is fc3 alone, under two Linears
    assert find_mlp_head(ResidualNet()) is None
    assert find_mlp_head(nn.Sequential(nn.Linear(D, K))) is None


def test_zero_biases_equal_the_bias_free_stack():
    model = _model()
    with torch.no_grad():
        for name in ("fc1", "fc2", "fc3"):
            model.get_submodule(name).bias.zero_()
    X, y = _data()
    table = analyze_head_splits(model, ["fc1", "fc2", "fc3"], {"train": (X, y)}, step=3)
    Phi = head_input(model, "fc1", X)
    weights = [model.fc1.weight.detach().double(), model.fc2.weight.detach().double()]
    ref = stack_split_metrics(Phi, weights, y)  # no AGOP: compare the other representations
    for layer, split in enumerate(ref, start=1):
        for rep, values in split.metrics.items():
            for key, v in values.items():
                got = table.query("layer == @layer and representation == @rep and metric == @key")["value"]
                assert got.item() == pytest.approx(v, rel=1e-10, abs=1e-12), (layer, rep, key)
    assert set(table["node"]) == {"fc1", "fc2"} and set(table["step"]) == {3}


def _nc1_trace(H: np.ndarray, y: np.ndarray) -> float:
    """tr Sigma_W / tr Sigma_B in float64 numpy (class-balanced data: both conventions agree)."""
    mu = H.mean(0)
    means = np.stack([H[y == c].mean(0) for c in range(K)])
    within = np.mean([((H[y == c] - means[c]) ** 2).sum(1).mean() for c in range(K)])
    between = ((means - mu) ** 2).sum(1).mean()
    return float(within / between)


def test_biased_layer_matches_numpy_reference():
    model = _model(1)
    X, y = _data(seed=1)
    table = analyze_head_splits(model, ["fc1", "fc2", "fc3"], {"train": (X, y), "test": _data(60, 2)}, 0)
    with torch.no_grad():
        Phi = model.body(X).double().numpy()
    W1, b1 = model.fc1.weight.detach().double().numpy(), model.fc1.bias.detach().double().numpy()
    W2, b2 = model.fc2.weight.detach().double().numpy(), model.fc2.bias.detach().double().numpy()
    H1 = np.maximum(Phi @ W1.T + b1, 0)
    H2 = np.maximum(H1 @ W2.T + b2, 0)
    yn = y.numpy()
    layer_nc1 = table.query("split == 'train' and representation == 'layer' and metric == 'nc1_trace'")
    got = layer_nc1.sort_values("layer")["value"].to_numpy()
    np.testing.assert_allclose(got, [_nc1_trace(H1, yn), _nc1_trace(H2, yn)], rtol=1e-9)
    # the second layer's input is the first layer's biased output
    inp2 = table.query("split == 'train' and layer == 2 and representation == 'input' "
                       "and metric == 'nc1_trace'")
    assert inp2["value"].item() == pytest.approx(_nc1_trace(H1, yn), rel=1e-9)
    # the NFA is measured on the train split only, and is a correlation
    nfa = table.query("metric == 'nfa_sqrt'")
    assert set(nfa["split"]) == {"train"} and len(nfa) == 2 and (nfa["value"].abs() <= 1).all()
    # the tidy schema of the network analysis, plus node
    assert list(table.columns) == [*empty_analysis().columns, "node"]
    assert table["layer"].dtype == "int64" and table["value"].dtype == "float64"


def test_bias_does_not_change_the_svd_projection():
    model = _model(2)
    X, y = _data(seed=3)
    Phi = head_input(model, "fc1", X)
    biased = analyze_head(model, ["fc1", "fc2", "fc3"], Phi, y, "test", 0, agops=None)
    with torch.no_grad():
        model.fc1.bias.zero_()
    plain = analyze_head(model, ["fc1", "fc2", "fc3"], Phi, y, "test", 0, agops=None)
    pick = "layer == 1 and representation in ('input', 'svd')"
    np.testing.assert_allclose(biased.query(pick)["value"], plain.query(pick)["value"], rtol=1e-12)
    ref = layer_metrics(Phi.double(), y)["nc1_trace"]
    got = biased.query("layer == 1 and representation == 'input' and metric == 'nc1_trace'")["value"]
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_analyze_model_end_to_end(tmp_path):
    src = tmp_path / "headnet.py"
    src.write_text(
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"
        "class HeadNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        self.fc1, self.fc2, self.fc3 = nn.Linear({D}, 10), nn.Linear(10, 8), nn.Linear(8, {K})\n\n"
        "    def forward(self, x):\n"
        "        return self.fc3(F.relu(self.fc2(torch.relu(self.fc1(x)))))\n")
    torch.manual_seed(5)
    spec = importlib.util.spec_from_file_location("headnet", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    state = mod.HeadNet().state_dict()
    torch.save(state, tmp_path / "epoch_004.pt")
    settings = {"model": f"python:{src}:HeadNet", "dataset": "x", "batch_size": 32}
    splits = {"train": _data(60, 6), "test": _data(30, 7)}
    table = analyze_model(settings, "head", [(0, None), (4, str(tmp_path / "epoch_004.pt"))], splits,
                          agop_samples=30)
    assert list(table.columns) == MODEL_COLUMNS
    assert set(table["step"]) == {0, 4} and set(table["node"]) == {"fc1", "fc2"}
    assert (table["run"] == "head").all() and table["convention"].str.endswith("agop_samples=30").all()
    # step 4 is the saved state: its layer NC1 is that of the saved weights, not of the seed
    m = mod.HeadNet()
    m.load_state_dict(state)
    X, y = splits["train"]
    W1, b1 = m.fc1.weight.detach().double().numpy(), m.fc1.bias.detach().double().numpy()
    H1 = np.maximum(X.double().numpy() @ W1.T + b1, 0)
    got = table.query("step == 4 and split == 'train' and layer == 1 and representation == 'layer' "
                      "and metric == 'nc1_trace'")["value"].item()
    assert got == pytest.approx(_nc1_trace(H1, y.numpy()), rel=1e-6)
    none = analyze_model({"model": f"python:{src}:HeadNet", "dataset": "x", "classifier": "fc1"}, "x",
                         [(0, None)], splits)
    assert none.empty and list(none.columns) == MODEL_COLUMNS == list(empty_model_analysis().columns)
    assert isinstance(none, pd.DataFrame)


def test_report_section_names_steps_and_linears_for_models_only():
    from dnc.report.analysis import analysis_claims, last_epoch_table

    model = _model(4)
    splits = {"train": _data(60, 8), "test": _data(30, 9)}
    t0 = analyze_head_splits(model, ["fc1", "fc2", "fc3"], splits, 0)
    with torch.no_grad():
        model.fc2.weight.mul_(2.0)
    t1 = analyze_head_splits(model, ["fc1", "fc2", "fc3"], splits, 5)
    table = pd.concat([t0, t1], ignore_index=True).assign(run="m")
    net = table.drop(columns="node").assign(run="n")
    claims = analysis_claims(pd.concat([net, table, empty_model_analysis()], ignore_index=True))
    evidence = claims[1]["evidence"]
    assert "n: mean sqrt-NFA over layers" in evidence and "at epoch 0" in evidence and "at step 0" in evidence
    assert "at step" not in analysis_claims(net)[0]["evidence"]
    # the model run's last-step table is the network one of the same rows
    pd.testing.assert_frame_equal(last_epoch_table(table, "m"), last_epoch_table(net, "n"))
