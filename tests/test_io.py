"""Atomic writes and the feature file layout."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import dnc.io
from dnc.io import (
    DEVICE_KEY,
    BadInputError,
    atomic_path,
    iter_feature_chunks,
    read_layout,
    read_metadata,
    read_weights,
    set_device_record,
    write_features,
    write_parquet,
    write_weights,
)
from dnc.layout import FeatureColumn


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_feature_roundtrip_chunks_and_layout(tmp_path, rng):
    N = 23
    a, b = rng.standard_normal((N, 4)), rng.standard_normal((N, 2)).astype(np.float32)
    y = rng.integers(0, 3, N)
    cols = [(FeatureColumn("l1_input", 1, "input", 4, weight=1), a),
            (FeatureColumn("l2_output", 2, "output", 2), b)]
    path = tmp_path / "f.parquet"
    write_features(path, y, cols, predictions=y[::-1], row_group_rows=5, metadata={"dnc:step": 3})
    assert pq.ParquetFile(path).num_row_groups == 5
    assert read_layout(path) == [c for c, _ in cols] and read_metadata(path, "dnc:step") == 3
    np.testing.assert_array_equal(np.concatenate([H for H, _, _ in iter_feature_chunks(path, "l1_input")]), a)
    chunks = list(iter_feature_chunks(path, "l2_output", batch_rows=7))
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), b)
    assert chunks[0][0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), y[::-1])
    with pytest.raises(BadInputError, match="no feature column 'nope'"):
        next(iter_feature_chunks(path, "nope"))


def test_weights_roundtrip(tmp_path, rng):
    ws = [rng.standard_normal((5, 3)), rng.standard_normal((2, 5))]
    write_weights(tmp_path / "w.parquet", ws)
    got = read_weights(tmp_path / "w.parquet")
    assert list(got) == [1, 2]
    for i, w in enumerate(ws, start=1):
        np.testing.assert_array_equal(got[i], w)


def test_every_writer_records_the_device_of_the_process(tmp_path, monkeypatch, rng):
    """write_parquet, feature files and weight files carry dnc:device, as set by
    dnc.device.resolve_device; a stage's own value under that key wins."""
    monkeypatch.setattr(dnc.io, "_DEVICE_RECORD", {})
    record = {"device": "cuda:1", "name": "NVIDIA H200", "torch": "2.14.1", "cuda": "13.0"}
    set_device_record(record)
    record["name"] = "changed after the call"  # the record is a copy
    expected = {**record, "name": "NVIDIA H200"}
    write_parquet(pd.DataFrame({"x": [1.0]}), tmp_path / "t.parquet")
    write_features(tmp_path / "f.parquet", np.zeros(3, int),
                   [(FeatureColumn("l1_input", 1, "input", 2), rng.standard_normal((3, 2)))])
    write_weights(tmp_path / "w.parquet", [np.eye(2)], metadata={"dnc:step": 1})
    for name in ("t", "f", "w"):
        assert read_metadata(tmp_path / f"{name}.parquet", DEVICE_KEY) == expected, name
    write_parquet(pd.DataFrame({"x": [1.0]}), tmp_path / "own.parquet", {DEVICE_KEY: {"device": "mine"}})
    assert read_metadata(tmp_path / "own.parquet", DEVICE_KEY) == {"device": "mine"}


def test_a_process_that_never_resolves_a_device_records_the_cpu(tmp_path):
    path = tmp_path / "t.parquet"
    code = ("import pandas as pd, sys; from dnc.io import write_parquet; "
            f"write_parquet(pd.DataFrame({{'x': [1]}}), {str(path)!r}); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert read_metadata(path, DEVICE_KEY) == {"device": "cpu"}
