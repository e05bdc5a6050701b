"""Parquet I/O: atomic writes, the feature file layout, weight files.

Feature files (docs/schemas.md): one row per sample; columns ``label`` (int32), optional
``prediction`` (int32), and one ``fixed_size_list<float32|float64>[d]`` column per representation.
Each representation column reads back as an (N, d) array without a copy (the list's child buffer
reshaped), and row groups make it streamable chunk by chunk. The file's key-value metadata
``dnc:layout`` (JSON) lists each column's layer, representation, width and the weight that acts on
it; ``dnc:config`` holds the producing run's resolved config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dnc.layout import FeatureColumn

__all__ = [
    "BadInputError",
    "atomic_path",
    "open_parquet",
    "read_table",
    "read_frame",
    "write_parquet",
    "write_features",
    "read_layout",
    "read_num_classes",
    "read_metadata",
    "iter_feature_chunks",
    "write_weights",
    "read_weights",
]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of path; rename it onto path only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _with_metadata(table: pa.Table, metadata: Mapping[str, object] | None) -> pa.Table:
    if not metadata:
        return table
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()})
    return table.replace_schema_metadata(meta)


def write_parquet(
    df: pd.DataFrame | pa.Table, path: str | os.PathLike, metadata: Mapping[str, object] | None = None
) -> None:
    """Write a DataFrame or Table atomically; metadata values are stored as JSON under their keys."""
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(_with_metadata(table, metadata), tmp)


class BadInputError(ValueError):
    """An input file that cannot be used: unreadable, truncated, or not the schema expected. The
    message names the file and what is wrong."""


def _unreadable(path: str | os.PathLike, e: Exception) -> BadInputError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return BadInputError(f"{os.fspath(path)}: not a readable Parquet file ({first}); it may be "
                         f"truncated by a crash: delete it and rerun the job that writes it")


def open_parquet(path: str | os.PathLike, **kwargs) -> pq.ParquetFile:
    """pq.ParquetFile(path) whose failures name the file (a missing file stays FileNotFoundError)."""
    try:
        return pq.ParquetFile(path, **kwargs)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e


_KINDS = {"int": pa.types.is_integer, "float": pa.types.is_floating,
          "string": lambda t: (pa.types.is_string(t) or pa.types.is_large_string(t)
                               or pa.types.is_string_view(t)),
          "bool": pa.types.is_boolean,
          "list": lambda t: pa.types.is_list(t) or pa.types.is_fixed_size_list(t)}


def _checked(path: str | os.PathLike, columns: Mapping[str, str] | None) -> pq.ParquetFile:
    """Open path and check that each of columns (name -> kind: int, float, string, bool, list)
    exists with that kind, from the schema alone (no data read)."""
    pf = open_parquet(path)
    schema = pf.schema_arrow
    for name, kind in (columns or {}).items():
        if name not in schema.names:
            raise BadInputError(f"{os.fspath(path)}: missing column {name!r} (columns: {schema.names}); "
                                f"written by an older version? delete it and rerun its job")
        if not _KINDS[kind](schema.field(name).type):
            raise BadInputError(f"{os.fspath(path)}: column {name!r} has type {schema.field(name).type}, "
                                f"expected {kind}")
    return pf


def read_table(path: str | os.PathLike, columns: Mapping[str, str] | None = None,
               **kwargs) -> pa.Table:
    """Read the given columns (name -> kind, checked as in _checked; all when None) of a Parquet
    file; every failure names the file and the column. kwargs go to pq.read_table (e.g. filters)."""
    _checked(path, columns)
    try:
        return pq.read_table(path, columns=list(columns) if columns else None, **kwargs)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e


def read_frame(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Every column of a Parquet file as a DataFrame, after checking columns (name -> kind)."""
    pf = _checked(path, columns)
    try:
        return pf.read().to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e


def read_metadata(path: str | os.PathLike, key: str) -> object:
    """Decode the JSON value stored under key in a Parquet file's metadata (KeyError if absent)."""
    meta = open_parquet(path).schema_arrow.metadata or {}
    raw = meta.get(key.encode())
    if raw is None:
        raise KeyError(f"{path}: no metadata key {key!r}")
    return json.loads(raw)


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values)
    if values.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {values.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_features(
    path: str | os.PathLike,
    labels: np.ndarray,
    columns: list[tuple[FeatureColumn, np.ndarray]],
    predictions: np.ndarray | None = None,
    metadata: Mapping[str, object] | None = None,
    row_group_rows: int | None = None,
    row_group_mb: float = 64.0,
) -> None:
    """Write per-sample features, one fixed-size-list column per representation, atomically.

    Args:
        labels: (N,) integer labels. columns: (FeatureColumn, (N, d) float array) pairs.
        predictions: optional (N,) model predictions (for NC4).
        row_group_rows: rows per row group, the unit of streaming reads; None sizes row groups
            to about row_group_mb megabytes of feature data.
    """
    labels = np.asarray(labels)
    arrays = {"label": pa.array(labels.astype(np.int32))}
    if predictions is not None:
        arrays["prediction"] = pa.array(np.asarray(predictions).astype(np.int32))
    for col, values in columns:
        if values.shape != (labels.shape[0], col.dim):
            raise ValueError(f"{col.column}: expected shape ({labels.shape[0]}, {col.dim}), "
                             f"got {values.shape}")
        arrays[col.column] = _fixed_list(values)
    if row_group_rows is None:
        row_bytes = sum(v.shape[1] * v.itemsize for _, v in columns) + 8
        row_group_rows = max(1, int(row_group_mb * 2**20 // row_bytes))
    layout = [col.__dict__ for col, _ in columns]
    table = _with_metadata(pa.table(arrays), {"dnc:layout": layout, **(metadata or {})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows)


def read_layout(path: str | os.PathLike) -> list[FeatureColumn]:
    """The FeatureColumn entries of a feature file, in file order (dnc.layout)."""
    return [FeatureColumn(**c) for c in read_metadata(path, "dnc:layout")]


def read_num_classes(path: str | os.PathLike) -> int:
    """Largest label + 1 of a feature file, from the row-group statistics when present (no data
    read)."""
    pf = open_parquet(path)
    idx = pf.schema_arrow.get_field_index("label")
    top = -1
    for g in range(pf.num_row_groups):
        stats = pf.metadata.row_group(g).column(idx).statistics
        if stats is None or not stats.has_min_max:
            top = int(pq.read_table(path, columns=["label"]).column("label").to_numpy().max())
            break
        top = max(top, int(stats.max))
    return top + 1


def _list_to_array(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, d) NumPy view of a fixed-size-list array (zero-copy for a single chunk)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def iter_feature_chunks(
    path: str | os.PathLike, column: str, batch_rows: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Stream (features (b, d), labels (b,), predictions (b,) or None) from a feature file.

    batch_rows: rows per chunk; None yields one row group at a time (write_features sizes row
    groups to about 64 MB). Peak memory is a few row groups' worth, whatever the number of rows:
    pre-buffering is off because it holds whole column chunks (measured: 3x the memory).
    """
    pf = open_parquet(path, pre_buffer=False, buffer_size=1 << 22)
    names = pf.schema_arrow.names
    if column not in names:
        raise BadInputError(f"{path}: no feature column {column!r}; columns are {names}")
    if "label" not in names or not pa.types.is_integer(pf.schema_arrow.field("label").type):
        raise BadInputError(f"{path}: a feature file needs an integer 'label' column; columns are "
                            f"{pf.schema_arrow}")
    cols = ["label", column] + (["prediction"] if "prediction" in names else [])
    if batch_rows is None:
        batches = (pf.read_row_group(i, columns=cols) for i in range(pf.num_row_groups))
    else:
        batches = pf.iter_batches(batch_size=batch_rows, columns=cols)
    for batch in batches:
        pred = _ints(batch.column("prediction")) if "prediction" in names else None
        yield _list_to_array(batch.column(column)), _ints(batch.column("label")), pred


def _ints(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy()


def write_weights(path: str | os.PathLike, weights: list[np.ndarray],
                  metadata: Mapping[str, object] | None = None) -> None:
    """Store W_1..W_L: one row per layer with its shape and row-major values (float64)."""
    table = pa.table({
        "layer": pa.array(list(range(1, len(weights) + 1)), pa.int32()),
        "rows": pa.array([w.shape[0] for w in weights], pa.int32()),
        "cols": pa.array([w.shape[1] for w in weights], pa.int32()),
        "values": pa.array([np.asarray(w, np.float64).reshape(-1) for w in weights],
                           pa.list_(pa.float64())),
    })
    with atomic_path(path) as tmp:
        pq.write_table(_with_metadata(table, metadata), tmp)


def read_weights(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """layer -> (rows, cols) float64 weight matrix."""
    t = read_table(path, {"layer": "int", "rows": "int", "cols": "int", "values": "list"}).to_pydict()
    return {
        layer: np.asarray(v, np.float64).reshape(r, c)
        for layer, r, c, v in zip(t["layer"], t["rows"], t["cols"], t["values"])
    }
