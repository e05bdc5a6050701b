"""Collapse metrics of a Parquet feature file, two streaming passes per representation.

Memory is bounded by one chunk of batch_rows x d plus O(K d) state (O(d^2) with spectra), not by N.
The formulas live in formulas.py and the state in accumulators.py and ood.py; this module only
feeds them chunks read from files and shapes the tidy table (docs/schemas.md).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from dnc.device import resolve_device
from dnc.io import (
    iter_feature_chunks,
    open_parquet,
    read_layout,
    read_metadata,
    read_num_classes,
    read_weights,
)
from dnc.layout import folder_files, ood_pairs
from dnc.metrics.accumulators import metrics_from_chunks
from dnc.metrics.class_means import ClassMeanAccumulator
from dnc.metrics.formulas import Convention
from dnc.metrics.ood import ood_metrics

log = logging.getLogger(__name__)

__all__ = ["feature_file_metrics", "files_metrics", "folder_metrics", "feature_file_ood_metrics",
           "ood_file_metrics", "empty_metrics", "torch_chunks", "TIDY_COLUMNS", "METRICS_COLUMNS"]

TIDY_COLUMNS = ["run", "layer", "representation", "split", "step", "metric", "value", "convention"]
# Kinds of the tidy columns, for dnc.io.read_frame checks of a metrics file.
METRICS_COLUMNS = {"run": "string", "layer": "int", "representation": "string", "split": "string",
                   "step": "int", "metric": "string", "value": "float"}


def feature_file_metrics(
    path: str | os.PathLike,
    run: str,
    split: str | None = None,
    weights: Mapping[int, np.ndarray] | None = None,
    convention: Convention = Convention(),
    batch_rows: int | None = None,
    device: str = "auto",
    columns: list[str] | None = None,
    cache_mb: float = 1024.0,
) -> pd.DataFrame:
    """Metrics of every representation column of a feature file as a tidy long table.

    Two passes per column (class means, then residuals). A column whose features take at most
    cache_mb megabytes is read once and its chunks kept for the second pass; a larger one is read
    twice, so memory stays bounded by max(cache_mb, one chunk) whatever N is (0 disables caching).

    Args:
        path: feature file (dnc.io.write_features layout).
        run, split: identifiers carried into the table; split defaults to the file's metadata
            "dnc:split" (else "train"), the step comes from "dnc:step" (-1 if absent).
        weights: layer -> weight matrix; a column whose layout names weight l gets NC3 with W_l.
            The highest layer's weight is the classifier: its input column also gets the
            classifier measures (nc3_etf, uniform duality, nc4_classifier, classifier_error).
        batch_rows: rows per streamed chunk (None: one row group, about 64 MB as written by
            dnc.io.write_features).
        device: "auto", "cpu" or "cuda[:i]": where the accumulation runs.
        columns: restrict to these representation columns (default: all).

    Returns:
        DataFrame with TIDY_COLUMNS.
    """
    dev = resolve_device(device)
    weights = weights or {}
    step = int(_meta(path, "dnc:step", -1))
    split = split or str(_meta(path, "dnc:split", "train"))
    num_classes = read_num_classes(path)
    last = max(weights, default=None)  # W_L, the classifier, maps its input to the logits
    frames = []
    for col in read_layout(path):
        if columns is not None and col.column not in columns:
            continue
        W = weights.get(col.weight) if col.weight is not None else None

        def stream(col=col):
            return torch_chunks(path, col.column, batch_rows, dev)

        dtype = _dtype(path, col.column)
        nbytes = open_parquet(path).metadata.num_rows * col.dim * dtype.itemsize
        chunks = _Replay(stream) if nbytes <= cache_mb * 2**20 else stream

        name = f"{os.fspath(path)}:{col.column}"
        # The column's stored dtype (float32 for network features, float64 for DUFM runs) sets
        # the precision floor of the rank cutoff of Sigma_B^+ (docs/metrics.md section 3).
        values = metrics_from_chunks(chunks, num_classes, col.dim,
                                     None if W is None else torch.from_numpy(W).to(dev),
                                     convention, name, dev,
                                     classifier=None if W is None else col.weight == last,
                                     feature_dtype=dtype)
        frames.append(pd.DataFrame({"layer": col.layer, "representation": col.representation,
                                    "metric": list(values), "value": list(values.values())}))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "run", run)
    table["split"] = split
    table["step"] = step
    table["convention"] = convention.describe()
    return table[TIDY_COLUMNS]


def torch_chunks(path, column: str, batch_rows: int | None, device: torch.device):
    """(features (b, d), labels (b,), predictions (b,) or None) tensors of a feature column on
    device, read one row group ahead in a background thread (_prefetched)."""
    for H, y, pred in _prefetched(iter_feature_chunks(path, column, batch_rows)):
        with warnings.catch_warnings():
            # Arrow buffers are read-only; the metrics never write to them.
            warnings.simplefilter("ignore", UserWarning)
            H = torch.from_numpy(H).to(device, non_blocking=True)
        yield H, torch.from_numpy(y).to(device), (
            None if pred is None else torch.from_numpy(pred).to(device))


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """Yield the items of an iterator while a background thread already produces the next ones.

    Reading and decoding a Parquet row group happens in pyarrow without the GIL, so the next row
    group is read while the metrics process the current one (at most depth + 2 items in memory:
    the one in use, depth queued, one being read). Exceptions of the producer are re-raised here.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        """Queue item unless the consumer has gone (a blocking put would then never return)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()


class _Replay:
    """A chunk source whose first pass reads and keeps the chunks; later passes replay them."""

    def __init__(self, source) -> None:
        self.source, self.kept = source, None

    def __call__(self):
        if self.kept is not None:
            return iter(self.kept)
        self.kept = []

        def first():
            for chunk in self.source():
                self.kept.append(chunk)
                yield chunk

        return first()


def _dtype(path, column: str) -> np.dtype:
    """NumPy dtype of the values of a fixed-size-list feature column (from the schema alone)."""
    return np.dtype(open_parquet(path).schema_arrow.field(column).type.value_type.to_pandas_dtype())


def _meta(path, key: str, default):
    try:
        return read_metadata(path, key)
    except KeyError:
        return default


def files_metrics(features: list[str | os.PathLike], weights: list[str | os.PathLike], run: str,
                  **kwargs) -> pd.DataFrame:
    """feature_file_metrics of several files; each file gets the weights file of the same step
    (metadata "dnc:step"). kwargs go to feature_file_metrics."""
    by_step = {int(_meta(w, "dnc:step", -1)): w for w in weights}
    tables = []
    for f in features:
        w = by_step.get(int(_meta(f, "dnc:step", -1)))
        tables.append(feature_file_metrics(f, run, weights=read_weights(w) if w else None, **kwargs))
    return pd.concat(tables, ignore_index=True)


def empty_metrics() -> pd.DataFrame:
    """A tidy metrics table with no rows: the columns (TIDY_COLUMNS) and dtypes of a real one, for
    runs with nothing to measure (a diverged run)."""
    kinds = {"string": "string", "int": "int64", "float": "float64"}
    return pd.DataFrame({c: pd.Series(dtype=kinds[METRICS_COLUMNS.get(c, "string")]) for c in TIDY_COLUMNS})


def feature_file_ood_metrics(path: str | os.PathLike, ood_path: str | os.PathLike, column: str,
                             convention: Convention = Convention(), batch_rows: int | None = None,
                             device: str = "auto") -> dict[str, float]:
    """NC5 of one representation column: the ID class means from the feature file at path (one
    streaming pass over it), the OOD global mean from the same column of the OOD feature file at
    ood_path (one pass; its labels are ignored). Returns dnc.metrics.ood.ood_metrics' mapping."""
    dev = resolve_device(device)
    acc = None
    for H, y, _ in torch_chunks(path, column, batch_rows, dev):
        if acc is None:
            acc = ClassMeanAccumulator(read_num_classes(path), H.shape[1], device=dev,
                                       name=f"{path}:{column}")
        acc.accumulate(H, y)
    if acc is None:
        raise ValueError(f"{path}: no rows in column {column!r}")
    return ood_metrics(acc.compute(), torch_chunks(ood_path, column, batch_rows, dev), convention,
                       name=f"{ood_path}:{column}")


def ood_file_metrics(path: str | os.PathLike, ood_path: str | os.PathLike, run: str,
                     convention: Convention = Convention(), batch_rows: int | None = None,
                     device: str = "auto") -> pd.DataFrame:
    """NC5 of every representation column of an ID feature file against the same column of an OOD
    feature file, as tidy rows (TIDY_COLUMNS) with split "ood" and the step of the ID file.

    Raises:
        ValueError: the two files do not hold the same columns (naming both files).
    """
    layout, ood_layout = read_layout(path), read_layout(ood_path)
    if [(c.column, c.dim) for c in layout] != [(c.column, c.dim) for c in ood_layout]:
        raise ValueError(f"{ood_path}: its feature columns {[(c.column, c.dim) for c in ood_layout]} "
                         f"differ from those of {path} {[(c.column, c.dim) for c in layout]}")
    rows = []
    for col in layout:
        values = feature_file_ood_metrics(path, ood_path, col.column, convention, batch_rows, device)
        rows += [{"layer": col.layer, "representation": col.representation, "metric": k, "value": float(v)}
                 for k, v in values.items()]
    table = pd.DataFrame(rows)
    table.insert(0, "run", run)
    table["split"] = "ood"
    table["step"] = int(read_metadata(path, "dnc:step"))
    table["convention"] = convention.describe()
    return table[TIDY_COLUMNS]


def folder_metrics(folder: str | os.PathLike, run: str, convention: Convention = Convention(),
                   batch_rows: int | None = None, device: str = "auto") -> pd.DataFrame:
    """The compute_metrics stage: files_metrics of a network's feature folder (dnc.layout), each
    feature file with the weights file of its step, then NC5 (split "ood") of every epoch with an
    OOD feature file. No feature file (a run that diverged before its first feature epoch): no
    rows, the columns of a real table."""
    features, weights = folder_files(folder)
    table = (files_metrics(features, weights, run=run, convention=convention, batch_rows=batch_rows,
                           device=device) if features else empty_metrics())
    nc5 = [ood_file_metrics(train, ood, run, convention, batch_rows, device)
           for train, ood in ood_pairs(folder)]
    return pd.concat([table, *nc5], ignore_index=True)
