"""Parquet I/O: atomic writes, the feature file layout, weight files.

Feature files (docs/schemas.md): one row per sample; columns ``label`` (int32), optional
``prediction`` (int32), and one ``fixed_size_list<float32|float64>[d]`` column per representation.
Each representation column reads back as an (N, d) array without a copy (the list's child buffer
reshaped), and row groups make it streamable chunk by chunk. The file's key-value metadata
``dnc:layout`` (JSON) lists each column's layer, representation, width and the weight that acts on
it; ``dnc:config`` holds the producing run's resolved config.

Every Parquet file written here carries ``dnc:device``: what the writing process computed on
(device, GPU name, torch and CUDA versions, determinism settings; dnc.device.device_record), as
recorded by dnc.device.resolve_device, or {"device": "cpu"} in a process that never resolved a
device; no stage passes it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
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
    "FeatureWriter",
    "read_layout",
    "read_num_classes",
    "read_metadata",
    "iter_feature_chunks",
    "write_weights",
    "read_weights",
    "DEVICE_KEY",
    "set_device_record",
    "current_device_record",
]

DEVICE_KEY = "dnc:device"
# The process-wide record written under DEVICE_KEY (set by dnc.device.resolve_device).
_DEVICE_RECORD: dict[str, object] = {"device": "cpu"}


def set_device_record(record: Mapping[str, object]) -> None:
    """Make record the DEVICE_KEY metadata of every file this process writes from now on."""
    global _DEVICE_RECORD
    _DEVICE_RECORD = dict(record)


def current_device_record() -> dict[str, object]:
    """The record written under DEVICE_KEY now ({"device": "cpu"} until a device is resolved)."""
    return dict(_DEVICE_RECORD)


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


def _encoded(metadata: Mapping[str, object] | None) -> dict[bytes, bytes]:
    """metadata as JSON values, with the device record under DEVICE_KEY unless metadata has one."""
    metadata = {DEVICE_KEY: _DEVICE_RECORD, **(metadata or {})}
    return {k.encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()}


def _with_metadata(table: pa.Table, metadata: Mapping[str, object] | None) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **_encoded(metadata)})


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


class FeatureWriter:
    """Write a feature file (the layout of write_features) in row chunks, atomically.

    Used as a context manager: rows go to a temporary sibling of path (dnc.io.atomic_path), which
    is renamed onto path when the block ends without an exception; on an exception the temporary
    file is removed and nothing is left at path. Chunks are buffered until a row group is full
    (about row_group_mb megabytes of features, or row_group_rows rows), so memory holds at most
    one row group plus one chunk, whatever the number of rows; the file streams back one row group
    at a time (iter_feature_chunks) as a file written in one go does.

    Args:
        columns: the FeatureColumn of every feature column, in file order (their dicts become the
            "dnc:layout" metadata).
        dtypes: numpy dtype of the stored features, one for all columns or one per column.
        predictions: whether each chunk carries predictions (an int32 "prediction" column).
        metadata: further key-value metadata, stored as JSON.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        columns: Sequence[FeatureColumn],
        dtypes: np.dtype | type | Sequence[np.dtype | type] = np.float32,
        predictions: bool = False,
        metadata: Mapping[str, object] | None = None,
        row_group_rows: int | None = None,
        row_group_mb: float = 64.0,
    ) -> None:
        self.path, self.columns, self.predictions = Path(path), list(columns), predictions
        if isinstance(dtypes, (np.dtype, type, str)):
            dtypes = [dtypes] * len(self.columns)
        self.dtypes = [np.dtype(t) for t in dtypes]
        if len(self.dtypes) != len(self.columns):
            raise ValueError(f"{len(self.dtypes)} dtypes for {len(self.columns)} columns")
        if row_group_rows is None:
            row_bytes = sum(c.dim * t.itemsize for c, t in zip(self.columns, self.dtypes)) + 8
            row_group_rows = max(1, int(row_group_mb * 2**20 // row_bytes))
        self.row_group_rows = row_group_rows
        fields = [pa.field("label", pa.int32())]
        if predictions:
            fields.append(pa.field("prediction", pa.int32()))
        fields += [pa.field(c.column, pa.list_(pa.from_numpy_dtype(t), c.dim))
                   for c, t in zip(self.columns, self.dtypes)]
        meta = {"dnc:layout": [c.__dict__ for c in self.columns], **(metadata or {})}
        self.schema = pa.schema(fields, metadata=_encoded(meta))
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._atomic = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> FeatureWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._writer = pq.ParquetWriter(tmp, self.schema)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, labels: np.ndarray, features: Sequence[np.ndarray],
              predictions: np.ndarray | None = None) -> None:
        """Append b rows: labels (b,) integers, one (b, d_j) array per column (converted to the
        column's dtype), predictions (b,) when the writer was opened with predictions=True."""
        if self._writer is None:
            raise RuntimeError("FeatureWriter.write outside its with-block")
        labels = np.asarray(labels)
        b = labels.shape[0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be 1-D integers, got {labels.dtype} of shape {labels.shape}")
        if len(features) != len(self.columns):
            raise ValueError(f"{len(features)} feature arrays for {len(self.columns)} columns")
        if (predictions is None) == self.predictions:
            raise ValueError("predictions must be given exactly when the writer was opened with "
                             "predictions=True")
        arrays = [pa.array(labels.astype(np.int32, copy=False))]
        if predictions is not None:
            arrays.append(pa.array(np.asarray(predictions).astype(np.int32, copy=False)))
        for col, t, values in zip(self.columns, self.dtypes, features):
            values = np.asarray(values)
            if values.shape != (b, col.dim):
                raise ValueError(f"{col.column}: expected shape ({b}, {col.dim}), got {values.shape}")
            arrays.append(_fixed_list(values.astype(t, copy=False)))
        self._pending.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self._pending_rows += b
        self.rows += b
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write every full row group buffered (and the rest when final)."""
        table = pa.concat_tables(self._pending)  # zero-copy: the chunks stay where they are
        full = (table.num_rows // self.row_group_rows) * self.row_group_rows
        end = table.num_rows if final else full
        if end:
            self._writer.write_table(table.slice(0, end), row_group_size=self.row_group_rows)
        rest = table.slice(end)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            try:
                if exc_type is None and self._pending:
                    self._flush(final=True)
            finally:
                self._writer.close()
                self._writer, self._pending = None, []
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())  # removes the temporary file
            raise
        # Renames the temporary file onto path, or removes it when the block raised.
        return bool(self._atomic.__exit__(exc_type, exc, tb))


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
        labels: (N,) integer labels. columns: (FeatureColumn, (N, d) float array) pairs, stored in
            the array's dtype.
        predictions: optional (N,) model predictions (for NC4).
        row_group_rows: rows per row group, the unit of streaming reads; None sizes row groups
            to about row_group_mb megabytes of feature data.

    The arrays already in memory are written by one FeatureWriter (same schema and metadata).
    """
    labels = np.asarray(labels)
    for col, values in columns:
        if values.shape != (labels.shape[0], col.dim):
            raise ValueError(f"{col.column}: expected shape ({labels.shape[0]}, {col.dim}), "
                             f"got {values.shape}")
    with FeatureWriter(path, [c for c, _ in columns], [np.asarray(v).dtype for _, v in columns],
                       predictions is not None, metadata, row_group_rows, row_group_mb) as w:
        w.write(labels, [v for _, v in columns], predictions)


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


def write_weights(path: str | os.PathLike, weights: Sequence[np.ndarray] | Mapping[int, np.ndarray],
                  metadata: Mapping[str, object] | None = None) -> None:
    """Store weight matrices: one row per layer index with its shape and row-major values (float64).

    weights: W_1..W_L as a list (layer indices 1..L), or a mapping {layer index: W} (e.g. only the
    classifier of a model, under the index of its input's feature column); empty: a table with the
    columns and no rows (read_weights gives {})."""
    items = sorted(weights.items()) if isinstance(weights, Mapping) else list(enumerate(weights, 1))
    table = pa.table({
        "layer": pa.array([int(l) for l, _ in items], pa.int32()),
        "rows": pa.array([w.shape[0] for _, w in items], pa.int32()),
        "cols": pa.array([w.shape[1] for _, w in items], pa.int32()),
        "values": pa.array([np.asarray(w, np.float64).reshape(-1) for _, w in items],
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
