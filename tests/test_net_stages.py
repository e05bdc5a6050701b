"""The network stages as library calls, without Snakemake: extract_epochs, folder_metrics,
compare_network_stage, analyze_epochs and network_grams on a small trained run, and a diverged one."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dnc.grams import GRAM_COLUMNS
from dnc.io import BadInputError, read_weights, write_parquet
from dnc.layout import OOD_SPLIT, feature_file, folder_files, weights_file
from dnc.metrics import Convention
from dnc.metrics.streaming import TIDY_COLUMNS, folder_metrics
from dnc.nets.analysis import COLUMNS, analyze_epochs, analyze_splits, network_grams
from dnc.nets.extract import check_ood_shape, extract_epochs, head_objective, network_features
from dnc.nets.stage import compare_network_stage
from dnc.nets.train import export_snapshots, reached_epochs, read_history, restore_net, train_network
from dnc.settings import NetConfig

K, LAM = 3, 1e-3
SETTINGS = {"head_layers": 2, "lambda_H1": LAM, "lambda_W": LAM, "lr": 0.05}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run's snapshots (epochs 0 and 2), history and dataset metadata file."""
    root = tmp_path_factory.mktemp("run")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(K).repeat_interleave(12)
    X = (2 * torch.randn(K, 5, generator=g)[y] + torch.randn(len(y), 5, generator=g))[:, None]
    data = {"train": (X, y), "test": (X[::2], y[::2])}
    cfg = NetConfig(mlp_widths=(16,), head_layers=2, head_width=8, epochs=2, batch_size=12, lr=0.05,
                    lambda_H1=LAM, lambda_W=LAM, feature_epochs=(0, 2), device="cpu")
    rows = train_network(cfg, data, root / "resume", K, progress=False, on_nonfinite="stop")
    export_snapshots(root / "resume", root / "snapshots", reached_epochs(cfg.feature_epochs, rows))
    write_parquet(pd.DataFrame(rows).assign(run="r"), root / "history.parquet")
    write_parquet(pd.DataFrame({"x": [0]}), root / "dataset.parquet",
                  {"dnc:dataset": {"num_classes": K, "counts": {"train": len(y)}}})
    return root, data


def test_extract_writes_every_epoch_and_split_and_the_head_objective(run):
    root, data = run
    epochs = reached_epochs([0, 2], read_history(root / "history.parquet"))
    objective = extract_epochs("r", root / "snapshots", epochs, data, root / "features", K, LAM, LAM)
    assert objective["epoch"].tolist() == [0, 2] and set(objective["run"]) == {"r"}
    features, weights = folder_files(root / "features")
    assert features == [feature_file(root / "features", e, s) for e in (0, 2) for s in ("test", "train")]
    net, _ = restore_net(root / "snapshots" / "epoch2.pt")
    W = [w.detach().numpy() for w in net.head.weights]
    stored = read_weights(weights_file(root / "features", 2))
    assert all(np.array_equal(stored[l + 1], w) for l, w in enumerate(W))
    cols, _ = network_features(net, data["train"][0])
    expected = head_objective(cols[0][1], data["train"][1], W, K, LAM, LAM)
    assert objective.iloc[-1]["loss"] == pytest.approx(expected["loss"], rel=1e-12)
    reg = ["reg_H1"] + [f"reg_W{l}" for l in (1, 2, 3)]
    assert objective.iloc[-1]["loss"] == pytest.approx(objective.iloc[-1][["fit", *reg]].sum(), rel=1e-12)
    none = extract_epochs("r", root / "snapshots", [], data, root / "none", K, LAM, LAM)
    assert none.empty and list(none.columns) == ["run", "epoch", "loss"] and (root / "none").is_dir()


def test_compare_stage_reads_the_last_epoch_or_reports_divergence(run, tmp_path):
    root, data = run
    objective = extract_epochs("r", root / "snapshots", [0, 2], data, tmp_path / "features", K, LAM, LAM)
    write_parquet(objective, tmp_path / "objective.parquet")
    write_parquet(folder_metrics(tmp_path / "features", "r", device="cpu"), tmp_path / "metrics.parquet")
    files = [root / "dataset.parquet", root / "history.parquet", tmp_path / "objective.parquet",
             tmp_path / "metrics.parquet", tmp_path / "features"]
    comparison, verdict = compare_network_stage("r", *files, SETTINGS)
    v = verdict.iloc[0]
    assert len(verdict) == 1 and v["epoch"] == 2 and v["n"] == pytest.approx(12.0) and not comparison.empty
    assert v["final_loss"] == pytest.approx(objective.iloc[-1]["loss"])
    # A diverged history: its verdict, and none of the later stages' files is read.
    rows = read_history(root / "history.parquet").to_dict("records")
    rows.append({**rows[-1], "epoch": 3, "train_loss": math.inf})
    write_parquet(pd.DataFrame(rows), tmp_path / "diverged.parquet")
    missing = [tmp_path / "absent" / f for f in ("objective.parquet", "metrics.parquet", "features")]
    comparison, verdict = compare_network_stage("r", root / "dataset.parquet", tmp_path / "diverged.parquet",
                                                *missing, SETTINGS)
    assert comparison.empty and verdict.iloc[0]["verdict"] == "diverged" and verdict.iloc[0]["epoch"] == 3


def test_analyze_epochs_is_analyze_splits_per_epoch_with_run_and_convention(run):
    root, data = run
    conv = Convention()
    table = analyze_epochs("r", root / "snapshots", [2], data, agop_samples=9, convention=conv)
    assert list(table.columns) == ["run", *COLUMNS, "convention"]
    assert set(table["convention"]) == {f"{conv.describe()};agop_samples=9;split_input=post"}
    net, _ = restore_net(root / "snapshots" / "epoch2.pt")
    pd.testing.assert_frame_equal(table[COLUMNS], analyze_splits(net, data, 2, 9, conv))
    pre = analyze_epochs("r", root / "snapshots", [2], data, "cpu", 9, conv, split_input="pre")
    assert set(pre["convention"]) == {f"{conv.describe()};agop_samples=9;split_input=pre"}
    pd.testing.assert_frame_equal(pre[COLUMNS], analyze_splits(net, data, 2, 9, conv, "pre"))
    assert not pre[COLUMNS].equals(table[COLUMNS])  # the head's second layer sees another Phi
    empty = analyze_epochs("r", root / "snapshots", [], data)
    assert empty.empty and list(empty.columns) == list(table.columns)
    assert [str(empty[c].dtype) for c in ("layer", "step", "value")] == ["int64", "int64", "float64"]
    assert list(empty.columns) == TIDY_COLUMNS


def test_network_grams_are_the_centred_cosines_of_the_nets_own_representations(run):
    """The Grams at an epoch: H_1 and every head layer's ReLU output of the restored net
    (net.representations), rows centred by the mean of every training row and normalised."""
    root, data = run
    X, y = data["train"]
    table = network_grams("r", root / "snapshots", 2, data["train"], seed=5).to_pandas()
    assert list(table.columns) == GRAM_COLUMNS
    assert set(table["step"]) == {2} and set(table["split"]) == {"train"}
    net, _ = restore_net(root / "snapshots" / "epoch2.pt")
    with torch.no_grad():
        reps = {k: v.double().numpy() for k, v in net.eval().representations(X).items()}
    # layer 1's input is H_1; layer l's output is the post-activation of head layer l + 1
    expected = {(1, "input"): reps["l1_input"], (1, "layer"): reps["l2_post"], (2, "layer"): reps["l3_post"]}
    assert sorted(table.groupby(["layer", "representation"]).groups) == sorted(expected)
    for (layer, rep), g in table.groupby(["layer", "representation"]):
        rows = g["row"].to_numpy()
        assert sorted(rows.tolist()) == list(range(len(y)))  # 36 rows: all of them, sorted by class
        assert (np.diff(y.numpy()[rows]) >= 0).all() and np.array_equal(g["label"], y.numpy()[rows])
        U = expected[layer, rep][rows] - expected[layer, rep].mean(axis=0)
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        np.testing.assert_allclose(np.stack(g["gram"].to_numpy()), U @ U.T, atol=1e-5)
    none = network_grams("r", root / "snapshots", None, data["train"])
    assert none.num_rows == 0 and none.column_names == GRAM_COLUMNS


def test_ood_samples_must_have_the_training_shape_and_history_its_columns(tmp_path):
    check_ood_shape(torch.zeros(4, 1, 5), torch.zeros(9, 1, 5), "ood.parquet", "train.parquet")
    with pytest.raises(BadInputError, match=r"ood.parquet: OOD samples of shape \(8,\).*train.parquet"):
        check_ood_shape(torch.zeros(4, 8), torch.zeros(9, 1, 5), "ood.parquet", "train.parquet")
    assert OOD_SPLIT == "ood"
    write_parquet(pd.DataFrame({"epoch": [1], "loss": [0.5]}), tmp_path / "h.parquet")
    with pytest.raises(BadInputError, match="missing column 'train_loss'"):
        read_history(tmp_path / "h.parquet")
