"""The Deep RFM stage: row selection, tidy metrics from the shared engine, feature columns."""

import numpy as np
import pandas as pd
import pytest

from dnc.metrics import layer_metrics
from dnc.metrics.streaming import TIDY_COLUMNS
from dnc.rfm.stage import feature_columns, layer_table, rfm_metrics, run_rfm, select_rows
from dnc.settings import RFMConfig


def blobs(rng, K=3, d=6, n=20):
    y = np.repeat(np.arange(K), n)
    X = 3 * rng.standard_normal((K, d))[y] + rng.standard_normal((K * n, d))
    return X.astype(np.float32), y


def test_select_rows_first_or_balanced(rng):
    X, y = blobs(rng)
    Xs, ys = select_rows(X, y, 9, balanced=False)
    assert list(ys) == [0] * 9
    Xs, ys = select_rows(X, y, 9, balanced=True)
    assert np.bincount(ys).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="n = 100 but the split has only 60 rows"):
        select_rows(X, y, 100, balanced=False)


@pytest.mark.parametrize("write_features", [False, True])
def test_metrics_are_the_shared_engine_on_each_representation(rng, write_features):
    train, test = blobs(rng), blobs(rng, n=7)
    cfg = RFMConfig(dataset="x", depth=2, width=16, device="cpu", n=30, balanced=True,
                    write_features=write_features)
    seen = {}

    def copy(rec):  # the hook sees all three representations of both splits
        for split, reps in (("train", rec.train), ("test", rec.test)):
            seen[rec.layer, split] = {k: v.clone() for k, v in reps.items()}

    res = run_rfm(cfg, train, test, num_classes=3, run="r", progress=False, on_layer=copy)
    labels, table = res.labels, res.metrics
    assert np.bincount(labels["train"]).tolist() == [10, 10, 10] and len(labels["test"]) == 21
    assert list(table.columns) == TIDY_COLUMNS and set(table["step"]) == {0}
    assert len(table.groupby(["layer", "representation", "split"])) == 2 * 3 * 2
    for layer, rep, split in [(1, "input", "train"), (2, "mapped", "test"), (2, "projected", "train")]:
        expected = layer_metrics(seen[layer, split][rep], labels[split])["nc1_trace"]
        got = table[(table["layer"] == layer) & (table["representation"] == rep) & (table["split"] == split)
                    & (table["metric"] == "nc1_trace")]["value"].item()
        assert got == pytest.approx(expected, rel=1e-12)
    info = layer_table(res.layers, "r")
    assert list(info["layer"]) == [1, 2] and (info["seconds"] >= 0).all()
    # The Grams (gram_layers 1, 3, ... clipped to depth 2: layers 1 and 2) are the centred cosines
    # of the train rows the hook saw, all 30 of them here, sorted by class.
    grams = res.grams.to_pandas()
    assert sorted(grams.groupby(["layer", "representation"]).groups) == [
        (layer, rep) for layer in (1, 2) for rep in ("input", "projected")]
    for (layer, rep), g in grams.groupby(["layer", "representation"]):
        rows = g["row"].to_numpy()
        assert sorted(rows) == list(range(30)) and (np.diff(labels["train"][rows]) >= 0).all()
        H = seen[layer, "train"][rep].numpy()
        U = H[rows] - H.mean(axis=0)
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        np.testing.assert_allclose(np.stack(g["gram"].to_numpy()), U @ U.T, atol=1e-6)
    if not write_features:  # nothing kept once measured
        assert all(rec.train == {} and rec.test == {} for rec in res.layers)
        return
    cols = feature_columns(res.layers, "test")
    assert [c.column for c, _ in cols][:3] == ["l1_input", "l1_projected", "l1_mapped"]
    assert all(v.shape[0] == 21 for _, v in cols)
    assert np.array_equal(cols[5][1], seen[2, "test"]["mapped"].numpy())
    # The list of kept layers measures to the same table as the run did layer by layer.
    pd.testing.assert_frame_equal(rfm_metrics(res.layers, labels, "r"), table)


def test_cosine_map_needs_gamma():
    with pytest.raises(ValueError, match="gamma"):
        RFMConfig(dataset="x", feature_map="cosine")
