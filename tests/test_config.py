"""Grid expansion: stable readable run ids, the lambda shorthand, key-naming errors."""

from pathlib import Path

import pytest

from dnc.config import ConfigError, expand_dufm_runs

DEFAULTS = {"K": 2, "L": 3, "n": 10, "width": 16, "lambda_H1": 5e-3, "lambda_W": 5e-3, "lr": 0.5,
            "steps": 100, "optimizer": "gd", "tol": 0.0, "dtype": "float64", "init_std": None,
            "log_every": 10, "seeds": [0]}


def runs(experiments, **defaults):
    return expand_dufm_runs({"dufm": {"defaults": {**DEFAULTS, **defaults},
                                      "experiments": experiments}})


def test_grid_product_and_ids():
    r = runs({"scan": {"seeds": [0, 1], "grid": {"L": [2, 3], "lambda": [0.05, 0.074]}}})
    assert list(r)[:3] == ["scan-L2-lambda0.05-s0", "scan-L2-lambda0.05-s1",
                           "scan-L2-lambda0.074-s0"]
    assert len(r) == 8
    one = r["scan-L3-lambda0.074-s1"]
    assert one["L"] == 3 and one["lambda_H1"] == 0.074 and one["lambda_W"] == 0.074
    assert one["seed"] == 1 and one["grid"] == {"L": 3, "lambda": 0.074}


def test_ids_do_not_depend_on_unrelated_settings():
    a = runs({"e": {"grid": {"width": [8, 16]}}})
    b = runs({"e": {"lr": 0.1, "grid": {"width": [8, 16]}}})
    assert list(a) == list(b)
    assert a["e-width8-s0"]["lr"] != b["e-width8-s0"]["lr"]


def test_per_layer_lambda_in_grid():
    r = runs({"e": {"grid": {"lambda_W": [[1e-3, 2e-3, 3e-3], 5e-3]}}})
    assert list(r) == ["e-lambda_W0.001_0.002_0.003-s0", "e-lambda_W0.005-s0"]
    assert r["e-lambda_W0.001_0.002_0.003-s0"]["lambda_W"] == [1e-3, 2e-3, 3e-3]


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"dufm.experiments.e \(run e-s0\): lambda_W: 2 values for L = 3"):
        runs({"e": {"lambda_W": [1e-3, 1e-3]}})
    with pytest.raises(ConfigError, match=r"dufm.experiments.e: give either 'lambda'"):
        runs({"e": {"lambda": 1e-3, "lambda_W": 1e-3}})
    with pytest.raises(ConfigError, match=r"dufm.experiments.e.grid.L: must be a non-empty list"):
        runs({"e": {"grid": {"L": []}}})
    with pytest.raises(ConfigError, match=r"missing \['K'\]"):
        expand_dufm_runs({"dufm": {"defaults": {k: v for k, v in DEFAULTS.items() if k != "K"},
                                   "experiments": {"e": {}}}})


NET = {"dataset": "d", "arch": "mlp", "mlp_widths": [8], "bias": True, "init_gain": 1.0, "head_layers": 2,
       "head_width": 8, "loss": "mse", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "cosine",
       "epochs": 5, "batch_size": 8, "lambda_H1": 1e-5, "lambda_W": 1e-3, "weight_decay": 0.0,
       "checkpoint_every": 1, "feature_epochs": [1, 5], "seeds": [0, 1]}


def test_network_runs_and_their_errors():
    from dnc.config import expand_network_runs

    cfg = {"datasets": {"d": {"name": "digits"}, "e": {"name": "mnist1d"}},
           "networks": {"defaults": NET, "experiments": {"n": {"grid": {"dataset": ["d", "e"]}}}}}
    runs = expand_network_runs(cfg)
    assert list(runs) == ["n-datasetd-s0", "n-datasetd-s1", "n-datasete-s0", "n-datasete-s1"]
    assert runs["n-datasete-s1"]["dataset"] == "e" and runs["n-datasete-s1"]["seed"] == 1
    cfg["networks"]["experiments"] = {"n": {"dataset": "nope"}}
    with pytest.raises(ConfigError, match=r"networks.experiments.n.dataset: 'nope' is not a key"):
        expand_network_runs(cfg)
    cfg["networks"]["experiments"] = {"n": {"feature_epochs": [9]}}
    with pytest.raises(ConfigError, match=r"feature_epochs: \[9\] outside 0..5"):
        expand_network_runs(cfg)


def test_optional_keys_take_the_documented_defaults():
    from dnc.settings import DUFMConfig, optional_keys

    minimal = {k: DEFAULTS[k] for k in ("K", "L", "n", "width", "lambda_H1", "lambda_W", "lr", "steps")}
    r = expand_dufm_runs({"dufm": {"defaults": minimal, "experiments": {"e": {}}}})
    run = r["e-s0"]
    for key, default in optional_keys(DUFMConfig).items():
        if key not in ("seed", "device"):
            assert run[key] == default, key
    with pytest.raises(ConfigError, match=r"missing \['steps'\]"):
        expand_dufm_runs({"dufm": {"defaults": {k: v for k, v in minimal.items() if k != "steps"},
                                   "experiments": {"e": {}}}})


def test_network_grid_keys_and_layer_lists_are_checked_before_any_job():
    from dnc.config import expand_network_runs

    base = {"datasets": {"d": {"name": "digits"}}}
    with pytest.raises(ConfigError, match=r"networks.experiments.n.grid: unknown setting\(s\) \['lrr'\]"):
        expand_network_runs({**base, "networks": {"experiments": {"n": {"dataset": "d",
                                                                        "grid": {"lrr": [0.1, 0.2]}}}}})
    with pytest.raises(ConfigError, match=r"experiments.n \(run n-s0\): lambda_W: .*L = head_layers"):
        expand_network_runs({**base, "networks": {"experiments": {"n": {
            "dataset": "d", "head_layers": 3, "lambda_W": [1e-3, 1e-3]}}}})
    runs = expand_network_runs({**base, "networks": {"experiments": {"n": {"dataset": "d"}}}})
    assert runs["n-s0"]["head_layers"] == 3  # NetConfig's default


def _doc_value(v) -> str:
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_doc_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_doc_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def test_docs_config_states_every_default_as_defined():
    from pathlib import Path

    from dnc.data import DatasetSpec
    from dnc.dufm.compare import Tolerances
    from dnc.metrics import Convention
    from dnc.nets.compare import NETWORK_TOLERANCES
    from dnc.settings import DUFMConfig, ModelConfig, NetConfig, RFMConfig, optional_keys

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for cls, prefix in ((DUFMConfig, ""), (NetConfig, ""), (RFMConfig, ""), (DatasetSpec, ""),
                        (Convention, "convention."), (Tolerances, ""), (ModelConfig, "")):
        for key, value in optional_keys(cls).items():
            if key in ("seed", "device") and cls not in (DatasetSpec, ModelConfig) or key == "device":
                continue
            assert f"| `{prefix}{key}` | `{_doc_value(value)}` |" in doc, (cls.__name__, key, value)
    for key, value in NETWORK_TOLERANCES.items():
        assert f"`{key}` `{_doc_value(value)}`" in doc, key


def test_batches_group_runs_of_one_shape_in_run_order():
    from dnc.config import dufm_batches

    cfg = {"dufm": {"defaults": {**DEFAULTS, "batch": 1},
                    "experiments": {"scan": {"batch": 3, "seeds": [0, 1], "grid": {"width": [8, 16],
                                                                               "lambda": [0.01, 0.02]}},
                                    "one": {}}}}
    runs = expand_dufm_runs(cfg)
    batches = dufm_batches(cfg, runs)
    assert batches["one-s0"] == ["one-s0"]
    scan = {b: r for b, r in batches.items() if b.startswith("scan")}
    assert sorted(scan) == ["scan-0-b0", "scan-0-b1", "scan-1-b0", "scan-1-b1"]
    # grid keys in sorted order: lambda before width
    assert scan["scan-0-b0"] == ["scan-lambda0.01-width8-s0", "scan-lambda0.01-width8-s1",
                                 "scan-lambda0.02-width8-s0"]
    assert scan["scan-0-b1"] == ["scan-lambda0.02-width8-s1"]
    assert sorted(r for rs in batches.values() for r in rs) == sorted(runs)
    for members in batches.values():
        assert len({runs[r]["width"] for r in members}) == 1


def test_measure_groups_merge_an_experiments_batches_up_to_a_size():
    from dnc.config import dufm_batches, dufm_measure_groups

    cfg = {"dufm": {"defaults": {**DEFAULTS, "batch": 1},
                    "experiments": {"scan": {"batch": 3, "seeds": [0, 1, 2, 3], "grid": {"width": [8, 16]}},
                                    "one": {}}}}
    runs = expand_dufm_runs(cfg)
    batches = dufm_batches(cfg, runs)  # scan: two shapes, batches of 3 + 1 per shape
    groups = dufm_measure_groups(batches, runs, size=4)
    assert groups["one"] == ["one-s0"]
    scan = {g: r for g, r in groups.items() if g.startswith("scan")}
    assert sorted(scan) == ["scan-m0", "scan-m1"] and all(len(r) == 4 for r in scan.values())
    assert sorted(r for rs in groups.values() for r in rs) == sorted(runs)  # every run once
    assert dufm_measure_groups(batches, runs, size=100)["scan"] == [r for r in runs if r.startswith("scan")]
    assert len(dufm_measure_groups(batches, runs, size=1)) == len(batches)  # a batch is never split


def test_experiment_tolerances_override_the_theory_section():
    from dnc.config import dufm_tolerances, expand_dufm_runs

    config = {"theory": {"tolerances": {"loss_rtol": 1e-6, "grad_norm": 1e-7}},
              "dufm": {"defaults": {"K": 2, "L": 3, "n": 4, "width": 6, "lambda": 0.005, "lr": 0.5,
                                    "steps": 10},
                       "experiments": {"strict": {}, "slow": {"tolerances": {"loss_rtol": 1e-4},
                                                              "grid": {"width": [6, 8]}}}}}
    runs = expand_dufm_runs(config)
    tol = dufm_tolerances(config, runs)
    assert tol["strict-s0"] == {"loss_rtol": 1e-6, "grad_norm": 1e-7}
    assert tol["slow-width6-s0"] == tol["slow-width8-s0"] == {"loss_rtol": 1e-4, "grad_norm": 1e-7}
    assert "tolerances" not in runs["slow-width6-s0"]  # not a training setting


def test_grid_key_order_changes_neither_ids_nor_run_order():
    a = runs({"scan": {"seeds": [0, 1], "grid": {"width": [8, 16], "lambda": [0.05, 0.074]}}})
    b = runs({"scan": {"grid": {"lambda": [0.05, 0.074], "width": [8, 16]}, "seeds": [0, 1]}})
    assert list(a) == list(b) and a == b
    assert list(a)[:2] == ["scan-lambda0.05-width8-s0", "scan-lambda0.05-width8-s1"]


def test_canonical_params_ignore_key_order_and_int_spelling():
    from dnc.config import canonical

    a = runs({"e": {"lr": 1, "grid": {"width": [8]}}})
    b = runs({"e": {"grid": {"width": [8]}, "lr": 1.0}})
    assert repr(canonical(a)) == repr(canonical(b))
    assert isinstance(a["e-width8-s0"]["lr"], float)
    nested = {"b": {"y": 1, "x": (2, {"q": 1, "p": 0})}, "a": None}
    assert repr(canonical(nested)) == "{'a': None, 'b': {'x': [2, {'p': 0, 'q': 1}], 'y': 1}}"
    assert canonical(nested) == {"a": None, "b": {"y": 1, "x": [2, {"q": 1, "p": 0}]}}  # same content


def _net_config(arch, dataset, ood=None):
    return {"datasets": {"vec": {"name": "gaussian", "gaussian": {"dim": 7}},
                         "img": {"name": "digits"}, "img2": {"name": "digits", "classes": [1, 2]}},
            "networks": {"experiments": {"e": {"dataset": dataset, "arch": arch,
                                               **({"ood_dataset": ood} if ood else {})}}}}


def test_an_architecture_that_cannot_take_the_sample_shape_is_refused_naming_both():
    from dnc.config import expand_network_runs

    with pytest.raises(ConfigError) as e:
        expand_network_runs(_net_config("resnet20", "vec"))
    msg = str(e.value)
    assert "networks.experiments.e" in msg and "'resnet20'" in msg and "'vec'" in msg and "(1, 7)" in msg
    assert expand_network_runs(_net_config("resnet20", "img"))  # 8 x 8 images are fine
    assert expand_network_runs(_net_config("mlp", "vec"))
    with pytest.raises(ConfigError, match="ood_dataset 'vec' has samples of shape"):
        expand_network_runs(_net_config("mlp", "img", ood="vec"))
    assert expand_network_runs(_net_config("mlp", "img", ood="img2"))


def test_dataset_options_are_checked_naming_the_dataset():
    from dnc.config import dataset_specs

    with pytest.raises(ConfigError, match="datasets.vec: .*gaussian: unknown option"):
        dataset_specs({"datasets": {"vec": {"name": "gaussian", "gaussian": {"dims": 7}}}})
    with pytest.raises(ConfigError, match="datasets.x: .*n_per_clas"):
        dataset_specs({"datasets": {"x": {"name": "digits", "n_per_clas": 3}}})
    a = dataset_specs({"datasets": {"d": {"standardize": True, "name": "digits"}}})
    b = dataset_specs({"datasets": {"d": {"name": "digits", "standardize": True, "seed": 0}}})
    assert repr(a) == repr(b)  # order and an explicit default give the same params


@pytest.mark.parametrize("spec", [{"name": "digits"}, {"name": "mnist1d"},
                                  {"name": "gaussian", "gaussian": {"dim": 7, "n": 3}}])
def test_sample_shape_without_loading_matches_the_loaded_data(spec):
    from dnc.data import DatasetSpec, load_splits, sample_shape

    s = DatasetSpec(**spec)
    splits, _ = load_splits(s)
    assert tuple(splits["train"][0].shape[1:]) == sample_shape(s)


def _schema():
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml")
                          .read_text())


def test_schema_key_lists_match_the_dataclasses():
    """The schema is a second statement of the settings: its key lists must stay in step."""
    from dataclasses import fields

    from dnc.config import MODEL_KEYS, NET_KEYS, RFM_KEYS, RUN_KEYS
    from dnc.data import GAUSSIAN, DatasetSpec, TextSpec
    from dnc.dufm.compare import Tolerances
    from dnc.metrics import Convention
    from dnc.nets.compare import NETWORK_TOLERANCES
    from dnc.settings import LMTrainConfig

    props = _schema()["properties"]
    dufm = props["dufm"]["properties"]
    assert set(dufm["defaults"]["properties"]) == {*RUN_KEYS, "lambda", "seeds", "batch"}
    exp = dufm["experiments"]["additionalProperties"]["properties"]
    assert set(exp) == {*RUN_KEYS, "lambda", "seeds", "batch", "tolerances", "grid"}
    assert set(exp["grid"]["properties"]) <= {*RUN_KEYS, "lambda"}
    assert set(exp["tolerances"]["properties"]) == {f.name for f in fields(Tolerances)}
    for section, keys in (("networks", NET_KEYS), ("rfm", RFM_KEYS)):
        block = props[section]["properties"]
        assert set(block["defaults"]["properties"]) == {*keys, "seeds"}, section
        grid = block["experiments"]["additionalProperties"]["properties"]["grid"]
        assert set(grid["propertyNames"]["enum"]) == set(keys), section
    models = props["models"]["properties"]
    assert set(models["defaults"]["properties"]) == set(MODEL_KEYS)
    assert set(models["experiments"]["additionalProperties"]["properties"]) == set(MODEL_KEYS)
    dataset = props["datasets"]["additionalProperties"]["properties"]
    # one schema for every kind: the image/array options and the text options (dnc.data.TextSpec)
    assert set(dataset) == {f.name for f in fields(DatasetSpec)} | {f.name for f in fields(TextSpec)}
    lm = props["lm_training"]["additionalProperties"]["properties"]
    assert set(lm) == {f.name for f in fields(LMTrainConfig)} - {"device"}
    assert set(dataset["gaussian"]["properties"]) == set(GAUSSIAN)
    convention = props["metrics"]["properties"]["convention"]["properties"]
    assert set(convention) == {f.name for f in fields(Convention)}
    theory = props["theory"]["properties"]
    assert set(theory["tolerances"]["properties"]) == {f.name for f in fields(Tolerances)}
    # network tolerances override NETWORK_TOLERANCES inside a Tolerances (dnc.nets.compare)
    assert set(theory["network_tolerances"]["properties"]) == {f.name for f in fields(Tolerances)}
    assert set(NETWORK_TOLERANCES) <= {f.name for f in fields(Tolerances)}


def _allowed(build, key):
    """The choices a settings dataclass accepts for key, read from its error on a bogus value."""
    import ast
    import re

    with pytest.raises(ValueError) as e:
        build(key, "bogus-value")
    return set(ast.literal_eval(re.search(r"one of (\(.*?\)|\[.*?\])", str(e.value)).group(1)))


def test_schema_enums_match_the_choices_the_dataclasses_accept():
    from dnc.data import DatasetSpec
    from dnc.settings import DUFMConfig, NetConfig, RFMConfig

    props = _schema()["properties"]
    run = props["dufm"]["properties"]["defaults"]["properties"]
    net = props["networks"]["properties"]["defaults"]["properties"]
    rfm = props["rfm"]["properties"]["defaults"]["properties"]
    dufm_base = {k: v for k, v in DEFAULTS.items() if k != "seeds"}
    builders = {
        "dufm": (run, lambda k, v: DUFMConfig(**{**dufm_base, k: v})),
        "networks": (net, lambda k, v: NetConfig(**{k: v})),
        "rfm": (rfm, lambda k, v: RFMConfig(**{"dataset": "d", "gamma": 1.0, k: v})),
    }
    checked = 0
    for section, (keys, build) in builders.items():
        for key, spec in keys.items():
            if "enum" in spec:
                assert _allowed(build, key) == set(spec["enum"]), (section, key)
                checked += 1
    assert checked == 13
    names = props["datasets"]["additionalProperties"]["properties"]["name"]["enum"]
    assert _allowed(lambda k, v: DatasetSpec(name=v), "name") == set(names)


def _models(tmp_path, **exp):
    from dnc.config import expand_model_runs

    spec = {"model": "torchvision:resnet18", "dataset": "d", **exp}
    return expand_model_runs({"datasets": {"d": {"name": "digits"}}, "models": {"experiments": {"m": spec}}})


def test_model_checkpoints_and_steps_resolved_at_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("epoch_002.pth", "epoch_010.pth", "epoch_001.pth"):
        (tmp_path / name).write_bytes(b"")
    run = _models(tmp_path, checkpoints="epoch_*.pth", init=True)["m"]
    assert run["checkpoint_files"] == [[0, ""], [1, "epoch_001.pth"], [2, "epoch_002.pth"],
                                       [10, "epoch_010.pth"]]
    listed = _models(tmp_path, checkpoints=["later/ck-s7-e3.pt"], step_regex=r"-s(\d+)-")["m"]
    assert listed["checkpoint_files"] == [[7, "later/ck-s7-e3.pt"]]  # may not exist yet
    assert _models(tmp_path, checkpoints=["run/checkpoint-500/model.safetensors"])["m"][
        "checkpoint_files"] == [[500, "run/checkpoint-500/model.safetensors"]]


@pytest.mark.parametrize("exp,message", [
    ({"checkpoints": "nothing_*.pt"}, "checkpoint glob 'nothing_\\*.pt' matches no file"),
    ({"checkpoints": ["a/epoch_1.pt", "b/epoch_1.pt"]}, "step 1 twice"),
    ({"checkpoints": ["a/epoch_0.pt"], "init": True}, "step 0 twice"),
    ({}, "no checkpoint"),
    ({"checkpoints": ["final.pt"]}, "no integer in the file name"),
    ({"init": True, "model": "keras:thing"}, "model must be torchvision"),
    ({"init": True, "model": "python:model.py"}, "name the callable"),
    ({"init": True, "pool": "mean"}, "pool must be one of"),
    ({"init": True, "dataset": "nope"}, "models.experiments.m.dataset: 'nope' is not a key"),
])
def test_model_experiment_errors_name_the_key(tmp_path, monkeypatch, exp, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message) as e:
        _models(tmp_path, **exp)
    assert "models.experiments.m" in str(e.value)


def test_an_edited_image_changes_the_folder_datasets_fingerprint(tmp_path):
    """prepare_dataset's params carry a digest of an image folder's files: rewriting an image
    changes no folder's modification time, but it changes the digest (and so reruns)."""
    import os

    import numpy as np
    from PIL import Image

    from dnc.data import DatasetSpec, source_fingerprint

    for k in ("a", "b"):
        (tmp_path / "train" / k).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(tmp_path / "train" / k / "0.png")
    spec = DatasetSpec(name="folder", root=str(tmp_path))
    before, folder_mtime = source_fingerprint(spec), os.stat(tmp_path / "train" / "a").st_mtime_ns
    assert before == source_fingerprint(spec) and len(before) == 40
    image = tmp_path / "train" / "a" / "0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    assert os.stat(tmp_path / "train" / "a").st_mtime_ns == folder_mtime  # the folder did not change
    assert source_fingerprint(spec) != before
    assert source_fingerprint(DatasetSpec(name="digits")) is None


def test_agop_recipe_config_states_both_recipes():
    """config/agop_recipe.yaml (issue 18): the authors' MLP recipe and dnc's, on digits and MNIST-1D."""
    import yaml

    from dnc.config import expand_network_runs
    from dnc.settings import NetConfig

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "agop_recipe.yaml").read_text())
    runs = {run: NetConfig.from_settings(s) for run, s in expand_network_runs(config).items()}
    authors = [c for c in runs.values() if c.optimizer_restart == "epoch"]
    assert {c.dataset for c in authors} == {c.dataset for c in runs.values()} == {"digits", "mnist1d"}
    for c in authors:
        assert c.layer_init == ("xavier_uniform:0.1",) * 5 + ("default",)
        recipe = (c.arch, c.head_width, c.loss, c.loss_reduction, c.lr)
        assert recipe == ("plain", 512, "mse_pm1", "mean", 5e-5)
    assert 0 in set.intersection(*(set(c.feature_epochs) for c in runs.values()))  # the NFA at init
