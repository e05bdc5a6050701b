"""Models trained elsewhere through the whole DAG: a torchvision resnet18 on an image folder and a
custom model from a file on an .npz dataset, checkpoints in three formats written by the test,
per-layer NC1 against a float64 reference from the test's own forward hooks, and incremental
reruns (a new checkpoint, new layers, a metric setting)."""

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from test_workflow import planned_jobs, snakemake, workdir_copy

pytestmark = pytest.mark.slow

CUSTOM = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, d_in=12, width=16, num_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        self.hidden = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.act(self.hidden(self.body(x.flatten(1)))))


def make(**kwargs):
    return Small(**kwargs)
'''


def _images(root, per_class: dict[str, int], size=32, seed=0):
    """An ImageFolder tree of small RGB PNGs whose colour depends on the class (so it is learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for k, name in enumerate(("cat", "dog", "fox")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((size, size, 3))
                base[..., k] = 180
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")


def _checkpoints(folder, model_fn, epochs, seed=0):
    """State dicts of a model perturbed per epoch, saved three ways: a plain state dict (.pt), a
    training checkpoint {"model": state dict with DataParallel's module. prefix} (.pth) and
    safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = model_fn()
    paths = []
    for i, epoch in enumerate(epochs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        if i % 3 == 0:
            path = folder / f"epoch_{epoch:03d}.pt"
            torch.save(sd, path)
        elif i % 3 == 1:
            path = folder / f"epoch_{epoch:03d}.pth"
            torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": epoch}, path)
        else:
            path = folder / f"epoch_{epoch:03d}.safetensors"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    return paths


def _nc1_reference(H: np.ndarray, y: np.ndarray) -> float:
    """tr(Sigma_W Sigma_B^+) / K in float64 (global mean = mean of the class means, Sigma_W over
    all N samples, Sigma_B over the K centred means; docs/metrics.md), independent of dnc."""
    H = H.astype(np.float64)
    classes = np.unique(y)
    means = np.stack([H[y == k].mean(0) for k in classes])
    centred = means - means.mean(0)
    sigma_b = centred.T @ centred / len(classes)
    resid = H - means[np.searchsorted(classes, y)]
    sigma_w = resid.T @ resid / len(y)
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-8, hermitian=True)) / len(classes))


def _hooked(model, names, X):
    """Outputs of the named modules for X, by the test's own forward hooks, avg-pooled over
    spatial positions (float64)."""
    out = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: out.__setitem__(n, o.detach().double())) for n in names]
    with torch.no_grad():
        model.eval()(X)
    for h in hooks:
        h.remove()
    return {n: (t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t).numpy() for n, t in out.items()}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import importlib.util

    import torchvision

    tmp = tmp_path_factory.mktemp("models")
    (tmp / "wf").mkdir()
    wd = workdir_copy(tmp / "wf")
    _images(tmp / "imgs", {"train": 8, "test": 4})
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    x = (rng.normal(size=(60, 1, 12)) + y[:, None, None] * 0.8).astype(np.float32)
    np.savez(tmp / "arr.npz", x_train=x[::2], y_train=y[::2], x_test=x[1::2], y_test=y[1::2])
    (tmp / "mymodel.py").write_text(CUSTOM)
    spec = importlib.util.spec_from_file_location("mymodel", tmp / "mymodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rn = _checkpoints(tmp / "ck_rn", lambda: torchvision.models.resnet18(num_classes=3), [1, 2, 3])
    _checkpoints(tmp / "ck_small", mod.make, [5, 10])
    cfg = {
        "device": "cpu",
        "datasets": {"imgs": {"name": "folder", "root": str(tmp / "imgs")},
                     "arr": {"name": "arrays", "path": str(tmp / "arr.npz")}},
        "models": {"experiments": {
            "rn": {"model": "torchvision:resnet18", "kwargs": {"num_classes": 3}, "dataset": "imgs",
                   "checkpoints": rn, "init": True, "batch_size": 16},
            "small": {"model": f"python:{tmp / 'mymodel.py'}:make", "dataset": "arr",
                      "checkpoints": str(tmp / "ck_small" / "epoch_*"), "layers": ["body", "hidden", "act"],
                      "pool": "none"}}},
    }
    out = snakemake(wd, cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"wd": wd, "tmp": tmp, "cfg": cfg, "rn": rn, "mod": mod}


def test_every_checkpoint_and_layer_is_measured_and_reported(measured):
    wd = measured["wd"]
    rn = pd.read_parquet(wd / "results/metrics/rn/metrics.parquet")
    assert set(rn["step"]) == {0, 1, 2, 3} and set(rn["split"]) == {"train", "test"}
    nodes = rn.drop_duplicates("layer").set_index("layer")["node"]
    assert list(nodes) == sorted(nodes, key=list(nodes).index) and "layer4" in set(nodes)
    assert "fc" not in set(nodes)  # the classifier's output (logits) is not a feature layer
    fed = rn.loc[rn["metric"] == "nc3", "node"].unique()
    assert list(fed) == [nodes.iloc[-1]]  # NC3 at the classifier's input only
    acc = rn[rn["metric"] == "accuracy"]
    assert len(acc) == 8 and acc["value"].between(0, 1).all()
    summary = pd.read_parquet(wd / "results/report/summary.parquet")
    assert set(summary["kind"]) == {"model"} and {"rn", "small"} == set(summary["run"])
    html = (wd / "results/report/index.html").read_text()
    assert "Models and checkpoints" in html and "separation" in html


def test_per_layer_nc1_equals_a_float64_reference_from_forward_hooks(measured):
    import torchvision

    from dnc.data import read_split
    from dnc.models.checkpoints import read_state_dict

    wd = measured["wd"]
    X, y, _ = read_split(wd / "results/datasets/imgs.parquet", "train")
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(read_state_dict(measured["rn"][1]))  # the {"model": module.*} checkpoint
    names = ["layer1", "layer2", "layer3", "layer4"]
    ref = _hooked(model, names, X)
    table = pd.read_parquet(wd / "results/metrics/rn/metrics.parquet")
    got = table[(table["step"] == 2) & (table["split"] == "train") & (table["metric"] == "nc1_pinv")]
    for name in names:
        value = got.loc[got["node"] == name, "value"].item()
        assert value == pytest.approx(_nc1_reference(ref[name], y.numpy()), rel=1e-5), name

    small = measured["mod"].make()
    small.load_state_dict(read_state_dict(measured["tmp"] / "ck_small" / "epoch_010.pth"))
    Xs, ys, _ = read_split(wd / "results/datasets/arr.parquet", "test")
    ref = _hooked(small, ["body", "hidden", "act"], Xs)
    table = pd.read_parquet(wd / "results/metrics/small/metrics.parquet")
    got = table[(table["step"] == 10) & (table["split"] == "test") & (table["metric"] == "nc1_pinv")]
    for name in ("body", "hidden", "act"):
        value = got.loc[got["node"] == name, "value"].item()
        assert value == pytest.approx(_nc1_reference(ref[name], ys.numpy()), rel=1e-5), name


def test_incremental_reruns_of_model_experiments(measured):
    wd, cfg = measured["wd"], copy.deepcopy(measured["cfg"])
    assert planned_jobs(wd, cfg) == set()
    # A new checkpoint: only its extraction, then the experiment's metrics and the report.
    extra = measured["tmp"] / "ck_rn" / "epoch_004.pt"
    torch.save(torch.load(measured["rn"][0], weights_only=True), extra)
    cfg["models"]["experiments"]["rn"]["checkpoints"] = [*measured["rn"], str(extra)]
    jobs = _jobs_with_steps(wd, cfg)
    assert jobs == {("extract_model", "rn", "4"), ("model_metrics", "rn", ""), ("analyze_model", "rn", ""),
                    ("build_report", "", ""), ("all", "", "")}
    # Other layers: every step of that experiment is extracted again.
    cfg = copy.deepcopy(measured["cfg"])
    cfg["models"]["experiments"]["small"]["layers"] = ["body", "act"]
    assert {j for j in _jobs_with_steps(wd, cfg) if j[0] == "extract_model"} == {
        ("extract_model", "small", "5"), ("extract_model", "small", "10")}
    # A metric setting: the metrics and the MLP-head analysis, never extraction.
    cfg = copy.deepcopy(measured["cfg"])
    cfg["metrics"] = {"convention": {"global_mean": "samples"}}
    assert planned_jobs(wd, cfg) == {("model_metrics", "rn"), ("model_metrics", "small"),
                                     ("analyze_model", "rn"), ("analyze_model", "small"),
                                     ("build_report", ""), ("all", "")}


def _jobs_with_steps(wd, cfg) -> set[tuple[str, str, str]]:
    """(rule, run, step) of a dry run."""
    out = snakemake(wd, cfg, "-n")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = set()
    for block in re.split(r"\n(?=rule \w+:)", out.stdout + out.stderr)[1:]:
        rule = re.match(r"rule (\w+):", block).group(1)
        run = re.search(r"wildcards:.*?run=([^,\s]+)", block)
        step = re.search(r"wildcards:.*?step=(\d+)", block)
        jobs.add((rule, run.group(1) if run else "", step.group(1) if step else ""))
    return jobs
