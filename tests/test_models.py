"""dnc.models: model specs, checkpoints, layers, pooling, and extraction measured against a float64
reference computed here from the model's own forward hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dnc.io import BadInputError, read_layout, read_metadata, read_weights
from dnc.layout import feature_file, weights_file
from dnc.metrics.streaming import files_metrics
from dnc.models.build import ModelSpecError, build_model
from dnc.models.checkpoints import load_checkpoint, read_state_dict
from dnc.models.extract import extract_checkpoint
from dnc.models.layers import (
    LayerError,
    check_widths,
    find_classifier,
    list_layers,
    node_names,
    pool_features,
    resolve_layers,
)

CUSTOM = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=16, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.stem(x).mean((2, 3))
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(h)


def make(width=16, num_classes=4):
    return Net(width, num_classes)


def not_a_model():
    return 3
'''

BRANCHY = '''
import torch
from torch import nn


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > -1:
            h = h * 1.0
        return self.b(h)
'''


@pytest.fixture(scope="module")
def resnet():
    return build_model("torchvision:resnet18", {"num_classes": 10}, seed=0).eval()


def write_module(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- build


def test_torchvision_build_is_seeded(resnet):
    again = build_model("torchvision:resnet18", {"num_classes": 10}, seed=0)
    other = build_model("torchvision:resnet18", {"num_classes": 10}, seed=1)
    assert resnet.fc.out_features == 10
    assert torch.equal(resnet.conv1.weight, again.conv1.weight)
    assert not torch.equal(resnet.conv1.weight, other.conv1.weight)


def test_python_specs_file_relative_and_module(tmp_path, monkeypatch):
    path = write_module(tmp_path, "mynet.py", CUSTOM)
    model = build_model(f"python:{path}:make", {"width": 8, "num_classes": 3})
    assert model.head.out_features == 3 and model.head.in_features == 8
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert isinstance(build_model("python:mynet.py:Net"), nn.Module)
    assert sys.path == before  # the file's folder is not put on sys.path
    lin = build_model("python:torch.nn:Linear", {"in_features": 4, "out_features": 2})
    assert isinstance(lin, nn.Linear)


def test_model_spec_errors(tmp_path):
    path = write_module(tmp_path, "mynet.py", CUSTOM)
    broken = write_module(tmp_path, "broken.py", "import not_a_module_anywhere\n")
    cases = {
        "torchvision:resnet181": "resnet18",
        f"python:{tmp_path / 'missing.py'}:make": "not found",
        f"python:{path}:mak": "make",
        f"python:{broken}:make": "not_a_module_anywhere",
        f"python:{path}:not_a_model": "not a torch.nn.Module",
        "python:no_such_pkg.models:make": "No module named",
        "keras:resnet": "expected one of",
    }
    for spec, words in cases.items():
        with pytest.raises(ModelSpecError, match=words) as info:
            build_model(spec)
        assert spec in str(info.value)
    with pytest.raises(ModelSpecError, match="never downloaded"):
        build_model("torchvision:resnet18", {"weights": "DEFAULT"})
    with pytest.raises(ModelSpecError, match="calling it"):
        build_model(f"python:{path}:make", {"depth": 3})


def test_timm_spec():
    timm = pytest.importorskip("timm")
    model = build_model("timm:resnet18", {"num_classes": 10})
    assert isinstance(model, timm.models.ResNet) and model.fc.out_features == 10
    with pytest.raises(ModelSpecError, match="resnet18"):
        build_model("timm:resnet_18x")


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_formats(tmp_path, resnet):
    from safetensors.torch import save_file

    sd = resnet.state_dict()
    torch.save(sd, tmp_path / "epoch_001.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 2,
                "optimizer": {"lr": 0.1}}, tmp_path / "epoch_002.pt")
    torch.save({"ema": sd, "state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
               tmp_path / "both.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "epoch_003.safetensors")
    for name, key in [("epoch_001.pth", None), ("epoch_002.pt", None), ("epoch_003.safetensors", None),
                      ("both.pt", "state_dict"), ("both.pt", "ema")]:
        fresh = build_model("torchvision:resnet18", {"num_classes": 10}, seed=5)
        load_checkpoint(fresh, tmp_path / name, key)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items()), name
    with pytest.raises(BadInputError, match=r"several values are state dicts.*state_key"):
        read_state_dict(tmp_path / "both.pt")
    with pytest.raises(BadInputError, match=r"no key 'model'.*\['ema', 'state_dict'\]"):
        read_state_dict(tmp_path / "both.pt", "model")


def test_pickled_module_is_refused_with_how_to_resave(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(nn.Linear(3, 2), path)
    with pytest.raises(BadInputError) as info:
        read_state_dict(path)
    text = str(info.value)
    assert str(path) in text and "weights_only" in text
    assert "torch.save(model.state_dict(), path)" in text


def test_key_mismatch_names_missing_unexpected_and_closest(tmp_path, resnet):
    sd = dict(resnet.state_dict())
    sd["classifier.weight"] = sd.pop("fc.weight")
    del sd["fc.bias"]
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    with pytest.raises(BadInputError) as info:
        load_checkpoint(build_model("torchvision:resnet18", {"num_classes": 10}), path)
    text = str(info.value)
    assert str(path) in text and "2 missing, 1 unexpected" in text
    assert "fc.weight <- closest in the file: classifier.weight" in text
    sd = resnet.state_dict()
    torch.save(sd, path)
    with pytest.raises(BadInputError, match=r"fc.weight: file \(10, 512\), model \(7, 512\)"):
        load_checkpoint(build_model("torchvision:resnet18", {"num_classes": 7}), path)


# ---------------------------------------------------------------------------- layers


def test_layers_of_resnet18(resnet):
    names = node_names(resnet)
    assert {"x", "layer1.0.conv1", "flatten", "fc"} <= set(names)
    shapes = dict(list_layers(resnet, (3, 32, 32)))
    assert shapes["maxpool"] == (64, 8, 8) and shapes["layer4.1.relu_1"] == (512, 1, 1)
    assert shapes["flatten"] == (512,) and shapes["fc"] == (10,)
    name, fc = find_classifier(resnet)
    assert name == "fc" and fc is resnet.fc
    auto = resolve_layers(resnet, "auto", "fc", (3, 32, 32))
    assert auto == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                    "avgpool", "flatten"]  # not the logits: the classifier's output is no feature layer
    assert resolve_layers(resnet, "auto", None, (3, 32, 32))[-1] == "fc"  # without a classifier it is a block
    assert resolve_layers(resnet, ["layer2.0.add", "layer3"], "fc", (3, 32, 32)) == ["layer2.0.add", "layer3"]


def test_unknown_layer_names_the_closest(resnet):
    with pytest.raises(LayerError, match=r"'layer5'.*closest: .*layer4"):
        resolve_layers(resnet, ["layer5"], "fc", (3, 32, 32))
    with pytest.raises(LayerError, match="same node"):
        resolve_layers(resnet, ["layer1", "layer1.1.relu_1"], "fc", (3, 32, 32))
    with pytest.raises(LayerError, match="not an nn.Linear"):
        find_classifier(resnet, "avgpool")


def test_custom_model_auto_and_untraceable_fallback(tmp_path):
    model = build_model(f"python:{write_module(tmp_path, 'mynet.py', CUSTOM)}:make")
    assert find_classifier(model)[0] == "head"
    # ModuleList blocks stand for their children; the unused Linear produces nothing.
    assert resolve_layers(model, "auto", "head", (1, 5, 5)) == ["stem", "blocks.0", "blocks.1", "relu_1"]
    branchy = build_model(f"python:{write_module(tmp_path, 'branchy.py', BRANCHY)}:Branchy")
    assert node_names(branchy) == ["a", "b"]  # module names: tracing fails on the `if`
    assert list_layers(branchy, (6,)) == [("a", (8,)), ("b", (3,))]
    assert resolve_layers(branchy, "auto", "b", (6,)) == ["a"]  # b is the classifier
    assert resolve_layers(branchy, "auto", None, (6,)) == ["a", "b"]


# ---------------------------------------------------------------------------- pooling and widths


def test_pooling_rules():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 5, 6, generator=g)
    tokens = torch.randn(4, 7, 5, generator=g)
    flat = torch.randn(4, 9, generator=g)
    assert torch.allclose(pool_features(conv, "avg"), conv.mean((2, 3)))
    assert torch.equal(pool_features(conv, "max"), conv.amax((2, 3)))
    assert torch.equal(pool_features(conv, "flatten"), conv.reshape(4, -1))
    assert torch.allclose(pool_features(tokens, "avg"), tokens.mean(1))
    assert torch.equal(pool_features(tokens, "cls"), tokens[:, 0])
    for how in ("avg", "max", "flatten", "cls", "none"):
        out = pool_features(flat, how)
        assert torch.equal(out, flat) and out.data_ptr() != flat.data_ptr()  # a copy, never a view
    for t, how in [(conv, "none"), (conv, "cls"), (tokens, "none")]:
        with pytest.raises(LayerError):
            pool_features(t, how)
    assert pool_features(conv.double(), "avg").dtype == torch.float32


def test_width_check_names_layer_shape_and_options():
    shapes = {"layer1": (64, 8, 8), "flatten": (512,)}
    assert check_widths(shapes, {"layer1": "flatten"}) == {"layer1": 4096, "flatten": 512}
    with pytest.raises(LayerError) as info:
        check_widths(shapes, "flatten", max_width=1000)
    text = str(info.value)
    assert "'layer1'" in text and "(N, 64, 8, 8)" in text and "4,096" in text
    assert "avg: width 64" in text and "max: width 64" in text
    with pytest.raises(LayerError, match="pool 'mean'"):
        check_widths(shapes, "mean")


# ---------------------------------------------------------------------------- extraction


def reference_nc1(H: np.ndarray, y: np.ndarray, K: int) -> float:
    """tr(Sigma_W Sigma_B^+)/K in float64: Sigma_W with 1/N, Sigma_B of the class means about their
    mean (docs/metrics.md conventions), the pseudo-inverse on the K - 1 directions of the means."""
    H = H.astype(np.float64)
    means = np.stack([H[y == k].mean(0) for k in range(K)])
    within = H - means[y]
    sigma_w = within.T @ within / len(H)
    centred = means - means.mean(0)
    sigma_b = centred.T @ centred / K
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / K)


def test_extraction_matches_forward_hook_reference(tmp_path, resnet):
    K, n = 10, 5
    g = torch.Generator().manual_seed(1)
    splits = {"train": (torch.randn(K * n, 3, 32, 32, generator=g), torch.arange(K * n) % K),
              "test": (torch.randn(30, 3, 32, 32, generator=g), torch.arange(30) % K)}
    layers = ["layer2", "layer4", "flatten"]
    paths = {s: feature_file(tmp_path, 7, s) for s in splits}
    result = extract_checkpoint(resnet, splits, layers, {"layer2": "max"}, "fc", batch_size=16,
                                device="cpu", feature_paths=paths, weights_path=weights_file(tmp_path, 7),
                                metadata={"dnc:step": 7}, num_classes=K, progress=False)
    assert result["classifier_layer"] == 3 and result["predictions"]
    layout = read_layout(paths["train"])
    assert [(c.column, c.dim, c.weight) for c in layout] == [("l1_node", 128, None), ("l2_node", 512, None),
                                                             ("l3_node", 512, 3)]
    assert read_metadata(paths["train"], "dnc:nodes") == {"1": "layer2", "2": "layer4", "3": "flatten"}
    assert read_metadata(paths["test"], "dnc:split") == "test"
    W = read_weights(weights_file(tmp_path, 7))
    assert list(W) == [3] and np.array_equal(W[3], resnet.fc.weight.detach().double().numpy())

    # The reference: the model's own forward hooks, pooled here, NC1 by the formula above.
    X, y = splits["train"]
    seen = {}
    hooks = [resnet.layer2.register_forward_hook(lambda m, a, o: seen.__setitem__(1, o.amax((2, 3)))),
             resnet.layer4.register_forward_hook(lambda m, a, o: seen.__setitem__(2, o.mean((2, 3)))),
             resnet.fc.register_forward_pre_hook(lambda m, a: seen.__setitem__(3, a[0].clone()))]
    with torch.no_grad():
        logits = resnet(X)
    for h in hooks:
        h.remove()
    table = files_metrics([paths["train"]], [weights_file(tmp_path, 7)], run="m", device="cpu")
    nc1 = table[table.metric == "nc1_pinv"].set_index("layer")["value"]
    for layer in (1, 2, 3):
        assert nc1[layer] == pytest.approx(reference_nc1(seen[layer].numpy(), y.numpy(), K), rel=1e-4)
    assert "nc3" in set(table[table.layer == 3].metric) and "nc3" not in set(table[table.layer == 2].metric)
    pred = pq_column(paths["train"], "prediction")
    assert np.array_equal(pred, logits.argmax(1).numpy())
    assert result["accuracy"]["train"] == pytest.approx(float(np.mean(pred == y.numpy())))
    assert result["rows"] == {"train": 50, "test": 30}


def pq_column(path, name):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[name]).column(name).to_numpy()


def test_extraction_without_classifier_writes_empty_weights(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh())
    assert find_classifier(model) is None
    X, y = torch.randn(24, 6), torch.arange(24) % 3
    feats, weights = tmp_path / "epoch0_train.parquet", tmp_path / "epoch0_weights.parquet"
    result = extract_checkpoint(model, {"train": (X, y)}, "auto", "avg", None, 10, "cpu", {"train": feats},
                                weights, {"dnc:step": 0}, progress=False)
    assert not result["predictions"] and result["accuracy"] == {}  # output (N, 5), 3 classes
    assert read_weights(weights) == {}
    table = files_metrics([feats], [weights], run="m", device="cpu")
    assert sorted(table.layer.unique()) == [1, 2, 3, 4] and "nc3" not in set(table.metric)


def test_failure_midway_leaves_no_file(tmp_path):
    class Fragile(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            torch._assert(~torch.isnan(h).any(), "NaN input")
            return self.b(h)

    X = torch.randn(64, 4)
    X[40:] = float("nan")
    with pytest.raises(Exception, match="NaN input"):
        extract_checkpoint(Fragile(), {"train": (X, torch.arange(64) % 2)}, ["a", "b"], "avg", "b", 16,
                           "cpu", {"train": tmp_path / "f.parquet"}, tmp_path / "w.parquet", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_labels_must_be_integers(tmp_path):
    with pytest.raises(BadInputError, match="integer"):
        extract_checkpoint(nn.Linear(3, 2), {"train": (torch.randn(4, 3), torch.zeros(4))}, "auto", "avg",
                           None, 4, "cpu", {"train": tmp_path / "f.parquet"}, tmp_path / "w.parquet")


def test_layers_command():
    cmd = [sys.executable, "-m", "dnc", "layers", "torchvision:resnet18", "--input", "3,32,32",
           "--kwargs", json.dumps({"num_classes": 10})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert any(line.startswith("* layer4.1.relu_1") and "(N, 512, 1, 1)" in line and "auto: layer4" in line
               for line in lines)
    assert any(line.startswith("  layer1.0.conv1") and "(N, 64, 8, 8)" in line for line in lines)
    assert "classifier: fc (Linear 512 -> 10), its input: flatten" in out


def test_layers_command_errors(capsys):
    from dnc.__main__ import main

    assert main(["layers", "torchvision:resnet181", "--input", "3,32,32"]) == 2
    assert "resnet18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["layers", "torchvision:resnet18", "--input", "3,32,32", "--kwargs", "{num"])
