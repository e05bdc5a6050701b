"""Corrupt or mismatched inputs: the consuming code fails with a message naming the file and what
is wrong, never with a bare pyarrow traceback."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnc.data import DatasetSpec, prepare_dataset, read_split
from dnc.io import BadInputError, read_frame, read_weights, write_features, write_parquet, write_weights
from dnc.layout import FeatureColumn
from dnc.metrics.streaming import METRICS_COLUMNS, feature_file_metrics


def features(path, rng, n=30, d=4):
    y = np.repeat(np.arange(3), n // 3)
    write_features(path, y, [(FeatureColumn("l1_input", 1, "input", d, 1), rng.standard_normal((n, d)))])
    return path


def test_truncated_feature_file_names_the_file(tmp_path, rng):
    path = features(tmp_path / "f.parquet", rng)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a crash mid-copy
    with pytest.raises(BadInputError, match=r"f\.parquet: not a readable Parquet file .*truncated"):
        feature_file_metrics(path, "r", device="cpu")


def test_metrics_file_with_a_missing_column(tmp_path):
    path = tmp_path / "metrics.parquet"
    write_parquet(pd.DataFrame({"run": ["r"], "layer": [1], "metric": ["nc1_pinv"], "value": [0.1]}), path)
    with pytest.raises(BadInputError, match=r"metrics\.parquet: missing column 'representation'"):
        read_frame(path, METRICS_COLUMNS)


def test_metrics_file_with_a_wrongly_typed_column(tmp_path):
    path = tmp_path / "metrics.parquet"
    bad = {k: ["x"] if kind == "string" else [1] for k, kind in METRICS_COLUMNS.items()}
    bad["value"] = ["0.1"]  # text where a float belongs
    write_parquet(pd.DataFrame(bad), path)
    with pytest.raises(BadInputError, match=r"column 'value' has type \w*string, expected float"):
        read_frame(path, METRICS_COLUMNS)


def test_feature_file_whose_labels_do_not_match_its_rows(tmp_path, rng):
    path = features(tmp_path / "f.parquet", rng)
    table = pq.read_table(path)
    table = table.set_column(0, "label", pa.array(np.full(table.num_rows, 1.5)))  # float labels
    pq.write_table(table, path)
    with pytest.raises(BadInputError, match=r"f\.parquet: a feature file needs an integer 'label' column"):
        feature_file_metrics(path, "r", device="cpu")
    with pytest.raises(ValueError, match=r"expected shape \(30, 4\), got \(29, 4\)"):
        write_features(tmp_path / "g.parquet", np.zeros(30, int),
                       [(FeatureColumn("l1_input", 1, "input", 4, 1), rng.standard_normal((29, 4)))])


def test_dataset_file_of_an_older_schema(tmp_path):
    path = tmp_path / "digits.parquet"
    spec = DatasetSpec(name="gaussian", gaussian={"K": 3, "dim": 4, "separation": 2.0, "n": 5})
    prepare_dataset(spec, path)
    table = pq.read_table(path)
    pq.write_table(table.rename_columns(["index", "label", "split", "x"]).replace_schema_metadata(
        table.schema.metadata), path)  # the pixel column had another name
    with pytest.raises(BadInputError, match=r"digits\.parquet: missing column 'pixels'"):
        read_split(path, "train")
    pq.write_table(table.replace_schema_metadata({}), path)  # no dnc:dataset record
    with pytest.raises(BadInputError, match=r"digits\.parquet: no 'dnc:dataset' metadata"):
        read_split(path, "train")


def test_weights_file_that_is_not_one(tmp_path, rng):
    path = features(tmp_path / "w.parquet", rng)  # a feature file passed where weights belong
    with pytest.raises(BadInputError, match=r"w\.parquet: missing column 'layer'"):
        read_weights(path)
    good = tmp_path / "ok.parquet"
    write_weights(good, [np.eye(2)])
    assert np.array_equal(read_weights(good)[1], np.eye(2))
