"""config/paper.yaml end to end on the CPU at a tiny size, so that the GPU configuration cannot rot.

The smoke config is derived from paper.yaml (smoke_config), so that a new experiment there is
smoke-tested too: every experiment, grid value and recipe key is kept and only sizes shrink (SIZE_KEYS:
epochs, feature epochs, DUFM steps, Deep RFM rows and ReLU width, dataset rows; the first seed; Deep
RFM keeps depth 20). It runs through the real DAG (Snakemake on a copy of the workflow) on datasets
written here in their own on-disk formats: MNIST idx and SVHN .mat at 8 x 8 pixels (their formats
take any size), CIFAR-10 pickles at 32 x 32 x 3 (the format's only size), so the ResNet-18 with the
7 x 7 stem trains on CIFAR-shaped data. A CIFAR dataset that only Deep RFM reads gets an 8 x 8 colour
set in the SVHN format instead: at d = 3,072 each of its 20 layers would take a 3,072 x 3,072 eigh,
minutes here; the CIFAR reader itself is exercised by the network runs. The jobs read the tiny CIFAR
and SVHN files through datasets_ondisk.md5_free_env (their md5 sums cannot match the releases').
"""

import copy
import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import run_snakemake, workdir_copy
from datasets_ondisk import md5_free_env, tiny_cifar, tiny_mnist, tiny_svhn

from dnc.config import expand_dufm_runs, expand_network_runs, expand_rfm_runs
from dnc.data import read_split
from dnc.io import read_metadata
from dnc.layout import snapshot_file
from dnc.paths import dataset_path, net_paths, report_paths, rfm_paths, run_paths
from dnc.settings import ANALYSIS_ONLY, EXTRACTION_ONLY

ROOT = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())

ROWS, TEST_ROWS, SIDE = 250, 60, 8   # each MNIST / SVHN file: train and test rows, image side
CIFAR_ROWS = 10                      # per CIFAR batch file: 50 train rows, 10 test rows
NET_ROWS = 30                        # first_n of the network datasets (one batch of 128)
RFM_N, RFM_TEST_N, RFM_WIDTH = 200, 50, 64  # Deep RFM: a few hundred rows, a narrow ReLU map
EPOCHS, DUFM_STEPS, DUFM_LOG = 2, 40, 10
# Settings smoke_config shrinks; every other setting must reach the runs as paper.yaml states it.
SIZE_KEYS = {"dufm": {"steps", "log_every"}, "networks": {"epochs", "feature_epochs", "agop_samples"},
             "rfm": {"n", "test_n", "width"}}


def _cap(value, cap):
    return value if value is None else min(value, cap)


def _shrink_net(spec: dict, epochs_above: int) -> None:
    """Networks: at most EPOCHS epochs, the feature epochs among them (else the last), AGOP rows."""
    # Always written: a block without epochs would otherwise train NetConfig's default 20.
    spec["epochs"] = epochs = min(spec.get("epochs", epochs_above), EPOCHS)
    if "feature_epochs" in spec:
        spec["feature_epochs"] = [e for e in spec["feature_epochs"] if e <= epochs] or [epochs]
    if spec.get("agop_samples") is not None:
        spec["agop_samples"] = _cap(spec["agop_samples"], NET_ROWS)


def _shrink(section: str, spec: dict, epochs_above: int = EPOCHS) -> dict:
    """One defaults or experiment block of a section, sizes shrunk, recipe untouched."""
    spec = copy.deepcopy(spec)
    if "seeds" in spec:
        spec["seeds"] = spec["seeds"][:1]
    if section == "dufm":
        for key, cap in (("steps", DUFM_STEPS), ("log_every", DUFM_LOG)):
            if key in spec:
                spec[key] = _cap(spec[key], cap)
    elif section == "networks":
        _shrink_net(spec, epochs_above)
    elif section == "rfm":
        for key, cap in (("n", RFM_N), ("test_n", RFM_TEST_N), ("width", RFM_WIDTH)):
            if spec.get(key) is not None:
                spec[key] = _cap(spec[key], cap)
    grid = spec.get("grid") or {}
    assert not set(grid) & SIZE_KEYS[section], f"{section}: a grid over a size: extend smoke_config"
    return spec


def _dataset_users(config: dict) -> tuple[set[str], set[str]]:
    """Datasets read by network runs (their dataset and OOD dataset), and by Deep RFM runs."""
    nets = expand_network_runs(config).values()
    return ({s["dataset"] for s in nets} | {s["ood_dataset"] for s in nets if s.get("ood_dataset")},
            {s["dataset"] for s in expand_rfm_runs(config).values()})


def write_sources(root: Path) -> None:
    """Every on-disk format under root; root/rfm_colour: the 8 x 8 colour set for RFM-only CIFAR."""
    tiny_mnist(root, "MNIST", n=ROWS, size=SIDE, n_test=TEST_ROWS)
    tiny_mnist(root, "FashionMNIST", n=ROWS, size=SIDE, n_test=TEST_ROWS)
    tiny_cifar(root, n=CIFAR_ROWS, balanced=True)
    tiny_cifar(root, hundred=True, n=CIFAR_ROWS, balanced=True)
    tiny_svhn(root, ROWS, TEST_ROWS, size=SIDE)
    tiny_svhn(root / "rfm_colour", ROWS, TEST_ROWS, size=SIDE)


def smoke_datasets(config: dict, root: Path) -> dict:
    """paper.yaml's datasets read from root without download, with at most NET_ROWS train rows."""
    net_users, rfm_users = _dataset_users(config)
    out = {}
    for name, spec in config["datasets"].items():
        spec = {**spec, "root": str(root), "download": False}
        assert spec["name"] in ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn"), \
            f"dataset {name}: smoke_config writes no {spec['name']} files yet"
        for key in ("first_n", "n_per_class", "test_n_per_class", "max_per_class"):
            if spec.get(key) is not None:
                spec[key] = _cap(spec[key], NET_ROWS if key == "first_n" else 3)
        if spec["name"].startswith("cifar") and name in rfm_users and name not in net_users:
            spec = {**spec, "name": "svhn", "root": str(root / "rfm_colour")}
        out[name] = spec
    return out


def smoke_config(paper: dict, root: Path) -> dict:
    """paper.yaml with every size shrunk for the CPU (see the module docstring)."""
    config = {**copy.deepcopy(paper), "device": "cpu", "datasets": smoke_datasets(paper, root)}
    for key in ("net_resources", "rfm_resources"):  # one thread: tiny jobs run side by side
        if key in config:
            config[key] = {**config[key], "threads": 1}
    for section in SIZE_KEYS:
        block = config.get(section) or {}
        defaults = _shrink(section, block.get("defaults") or {})
        above = (block.get("defaults") or {}).get("epochs", 20)
        block["defaults"] = defaults
        block["experiments"] = {name: _shrink(section, spec, above)
                                for name, spec in (block.get("experiments") or {}).items()}
    return config


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(workdir, smoke config) after one Snakemake run of the whole smoke config."""
    tmp = tmp_path_factory.mktemp("paper")
    write_sources(tmp / "data")
    config = smoke_config(PAPER, tmp / "data")
    wd = workdir_copy(tmp_path_factory.mktemp("wf"))
    start = time.perf_counter()
    out = run_snakemake(wd, config, env=md5_free_env(tmp / "site"), timeout=1800)
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-4000:]
    print(f"paper smoke run: {seconds:.0f} s")  # shown with pytest -s
    return wd, config


def _recipe(settings: dict, section: str) -> dict:
    return {k: v for k, v in settings.items() if k not in SIZE_KEYS[section]}


def test_smoke_config_keeps_every_experiment_and_recipe_key(tmp_path):
    config = smoke_config(PAPER, tmp_path)
    for section, expand in (("dufm", expand_dufm_runs), ("networks", expand_network_runs),
                            ("rfm", expand_rfm_runs)):
        paper_runs, runs = expand(PAPER), expand(config)
        assert {s["experiment"] for s in runs.values()} == set(PAPER[section]["experiments"])
        assert set(runs) <= set(paper_runs)  # the same ids: grids kept, the first seed
        for rid, s in runs.items():
            assert _recipe(s, section) == _recipe(paper_runs[rid], section), rid
    assert all(s["depth"] == 20 for s in expand_rfm_runs(config).values())


def test_every_experiment_ran_and_the_report_was_built(smoke):
    wd, config = smoke
    files = [f for rid in expand_dufm_runs(config) for f in run_paths(rid).all()]
    for rid in expand_network_runs(config):
        p = net_paths(rid)
        files += [p.history, p.metrics, p.comparison, p.verdict, p.analysis]
    files += [f for rid in expand_rfm_runs(config) for f in (rfm_paths(rid).metrics, rfm_paths(rid).layers)]
    missing = [f for f in files if not (wd / f).exists()]
    assert not missing, missing
    report = report_paths()
    summary = pd.read_parquet(wd / report.summary)
    runs = {**expand_dufm_runs(config), **expand_network_runs(config), **expand_rfm_runs(config)}
    assert set(runs) <= set(summary["run"]) and (wd / report.html).stat().st_size > 0
    for rid in expand_rfm_runs(config):  # every layer of depth 20 measured
        layers = pd.read_parquet(wd / rfm_paths(rid).metrics, columns=["layer"])["layer"]
        assert set(layers) == set(range(1, 21)), rid


def test_network_datasets_in_their_formats(smoke):
    wd, config = smoke
    for rid, s in expand_network_runs(config).items():
        meta = read_metadata(wd / dataset_path(s["dataset"]), "dnc:dataset")
        spec = config["datasets"][s["dataset"]]
        assert meta["name"] == spec["name"], rid
        if spec.get("first_n") is not None:
            assert meta["counts"]["train"] == spec["first_n"], rid
        if spec["name"] == "cifar10":
            assert meta["shape"] == [3, 32, 32], rid


def _plain(value):
    """JSON's form of a value (tuples as lists), as the outputs' dnc:config metadata stores it."""
    return json.loads(json.dumps(value))


def test_the_recipe_reached_every_dufm_and_rfm_run(smoke):
    wd, config = smoke
    for section, expand, output in (("dufm", expand_dufm_runs, lambda r: run_paths(r).history),
                                    ("rfm", expand_rfm_runs, lambda r: rfm_paths(r).layers)):
        paper_runs = expand(PAPER)
        for rid in expand(config):
            stored = read_metadata(wd / output(rid), "dnc:config")
            assert _recipe(stored, section) == _plain(_recipe(paper_runs[rid], section)), rid


def _adam_steps(checkpoint: dict) -> set[int]:
    return {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}


def test_the_recipe_reached_every_network_run(smoke):
    """The paper's settings in the trained checkpoints and the analysis, and their effects: the loss
    of the history equals the one recomputed from the snapshot with nn.MSELoss on +-1 targets, Adam's
    step count restarts every epoch, resnet18_imagenet has its 7 x 7 stem."""
    wd, config = smoke
    paper_runs = expand_network_runs(PAPER)
    for rid, s in expand_network_runs(config).items():
        recipe = _recipe(paper_runs[rid], "networks")
        p = net_paths(rid)
        ck = torch.load(snapshot_file(wd / p.snapshots, s["feature_epochs"][0]), weights_only=True)
        for key in set(recipe) - set(ANALYSIS_ONLY) - set(EXTRACTION_ONLY) - {"seed", "experiment", "grid"}:
            value = recipe[key]
            assert ck["config"][key] == (tuple(value) if isinstance(value, list) else value), (rid, key)
        for key in ANALYSIS_ONLY:
            assert read_metadata(wd / p.analysis, f"dnc:{key}") == s[key], (rid, key)
        _check_loss(wd, rid, s, ck)
        last = torch.load(wd / p.resume / "last.pt", weights_only=True)
        steps = math.ceil(_train_rows(wd, s) / s["batch_size"])
        if s["optimizer"] == "adam":
            assert _adam_steps(last) == {steps * (1 if s["optimizer_restart"] == "epoch" else s["epochs"])}
        if s["arch"] == "resnet18_imagenet":
            assert any(t.ndim == 4 and tuple(t.shape[-2:]) == (7, 7) for t in ck["model"].values()), rid


def _train_rows(wd: Path, s: dict) -> int:
    return read_metadata(wd / dataset_path(s["dataset"]), "dnc:dataset")["counts"]["train"]


def _check_loss(wd: Path, rid: str, s: dict, ck: dict) -> None:
    """The history's test loss at the snapshot's epoch, recomputed from the snapshot's network."""
    from dnc.nets.train import restore_net

    net, _ = restore_net(snapshot_file(wd / net_paths(rid).snapshots, ck["epoch"]))
    X, y, meta = read_split(wd / dataset_path(s["dataset"]), "test")
    with torch.no_grad():
        logits = net(X)[0].double()
    one_hot = torch.nn.functional.one_hot(y, meta["num_classes"]).double()
    sq = (logits - {"mse": one_hot, "mse_pm1": 2 * one_hot - 1}[s["loss"]]) ** 2
    per_sample = sq.mean(1) if s["loss_reduction"] == "mean" else 0.5 * sq.sum(1)
    history = pd.read_parquet(wd / net_paths(rid).history).set_index("epoch")
    assert history.loc[ck["epoch"], "test_loss"] == pytest.approx(float(per_sample.mean()), rel=1e-4), rid
