"""Both splits after class selection, subsetting, transform and standardisation; the dataset
Parquet file written and read back."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dnc.data.loaders import Rows, Split, _digits, _gaussian, _mnist1d, _torchvision
from dnc.data.sources import folder_classes
from dnc.data.spec import DatasetSpec
from dnc.data.user import _arrays, _decode_images, _folder, _normalize
from dnc.io import BadInputError, read_metadata, read_table, write_parquet

if TYPE_CHECKING:  # torch is imported where it is used: the workflow parses without it
    import torch


SPLIT_STREAM = {"train": 0, "test": 1}  # max_per_class draws each split from its own stream


def balanced_rows(y: np.ndarray, max_per_class: int, seed: int, split: str) -> np.ndarray:
    """Sorted positions of at most max_per_class rows of every class of y (N,): all rows of a
    class that has no more, else a uniform draw without replacement (seeded by seed and split)."""
    rng = np.random.default_rng([seed, SPLIT_STREAM[split]])
    keep = []
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        keep.append(rows if len(rows) <= max_per_class else rng.choice(rows, max_per_class, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def keep_classes(X: np.ndarray, y: np.ndarray, pos: np.ndarray, classes: tuple[int, ...],
                 name: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of X (N, ...), y (N,), pos (N,) whose label is in classes, in source order, with the
    labels mapped to their position in classes."""
    present = set(np.unique(y).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"dataset {name!r}: classes {missing} do not occur in its {split} split "
                         f"(labels there: {sorted(present)})")
    keep = np.flatnonzero(np.isin(y, classes))
    relabel = np.full(max(present) + 1, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    return X[keep], relabel[y[keep]], pos[keep]


def subset(X: np.ndarray, y: np.ndarray, n_per_class: int | None, first_n: int | None) -> Split:
    if first_n is not None:
        return X[:first_n], y[:first_n]
    if n_per_class is None:
        return X, y
    keep = np.concatenate([np.flatnonzero(y == k)[:n_per_class] for k in np.unique(y)])
    short = [int(k) for k in np.unique(y) if (y == k).sum() < n_per_class]
    if short:
        raise ValueError(f"n_per_class = {n_per_class} but classes {short} have fewer samples")
    keep.sort()
    return X[keep], y[keep]


def _source_rows(spec: DatasetSpec) -> dict[str, Rows]:
    """Every row of both splits, with its position in the source split."""
    if spec.name == "folder":
        return _folder(spec)
    if spec.name == "arrays":
        return _arrays(spec)
    loader = {"digits": _digits, "mnist1d": _mnist1d, "gaussian": _gaussian}.get(spec.name, _torchvision)
    return {split: (X, y, np.arange(len(y))) for split, (X, y) in loader(spec).items()}


def _materialize(spec: DatasetSpec, splits: dict[str, Split]) -> dict[str, Split]:
    """Decode the kept images of a folder (after the transform) and normalize arrays; X of the
    other datasets is returned as it is."""
    t = spec.transform or {}
    if spec.name == "arrays" and "normalize" in t:
        return {s: (_normalize(X, t["normalize"], spec.path), y) for s, (X, y) in splits.items()}
    if spec.name != "folder":
        return splits
    decoded = {s: _decode_images(X, t) for s, (X, _) in splits.items()}
    shapes = {s: X.shape[1:] for s, X in decoded.items() if X is not None}
    if len(set(shapes.values())) > 1:
        raise BadInputError(f"{spec.root}: train/ images end up {shapes['train']} (C, H, W) and test/ "
                            f"images {shapes['test']} after the transform; give transform.resize [h, w] "
                            f"or a center_crop")
    if not shapes:
        raise BadInputError(f"{spec.root}: no images kept in either split")
    shape = next(iter(shapes.values()))
    return {s: (X if X is not None else np.empty((0, *shape), np.float32), splits[s][1])
            for s, X in decoded.items()}


def load_splits(spec: DatasetSpec) -> tuple[dict[str, Split], dict[str, np.ndarray]]:
    """Train and test arrays after class selection, subsetting, transform and optional
    standardisation, in that order.

    Returns (splits, index) where index[split] is each kept sample's position in its source split
    (before any class selection, so rows can be traced back to the source data: for a folder the
    position in the sorted file list of train/ or test/, for arrays the row of the source array;
    without a test split both splits index the train source).
    """
    splits, index = {}, {}
    for split, (X, y, pos) in _source_rows(spec).items():
        if spec.classes is not None:
            X, y, pos = keep_classes(X, y, pos, spec.classes, spec.name, split)
        if spec.max_per_class is not None:
            keep = balanced_rows(y, spec.max_per_class, spec.seed, split)
            X, y, pos = X[keep], y[keep], pos[keep]
        n = spec.n_per_class if split == "train" else spec.test_n_per_class
        first = spec.first_n if split == "train" else None
        X, _ = subset(X, y, n, first)
        pos, y = subset(pos, y, n, first)
        splits[split], index[split] = (X, y), pos
    splits = _materialize(spec, splits)  # only the rows kept are decoded
    if spec.standardize:
        Xtr = splits["train"][0].reshape(len(splits["train"][1]), -1)
        mean = Xtr.mean(0, dtype=np.float64)
        std = Xtr.std(0, dtype=np.float64)
        std[std == 0] = np.inf  # constant features map to 0
        for split, (X, y) in splits.items():
            flat = (X.reshape(len(y), -1) - mean) / std
            splits[split] = (flat.astype(np.float32).reshape(X.shape), y)
    return splits, index


def _class_names(spec: DatasetSpec) -> list[str] | None:
    """Name of each class 0..K-1 of a folder (its subfolder, in the order of classes when they
    select a subset); None for the other datasets."""
    if spec.name != "folder":
        return None
    names = folder_classes(spec)
    return [names[c] for c in spec.classes] if spec.classes is not None else names


def prepare_dataset(spec: DatasetSpec, path: str | os.PathLike) -> dict:
    """Write the dataset Parquet file (both splits); returns its metadata record."""
    splits, index = load_splits(spec)
    shape = list(splits["train"][0].shape[1:])
    D = int(np.prod(shape))
    parts = []
    for split, (X, y) in splits.items():
        flat = pa.array(np.ascontiguousarray(X, dtype=np.float32).reshape(-1))
        parts.append(pa.table({
            "index": pa.array(index[split], pa.int64()),
            "label": pa.array(y.astype(np.int32)),
            "split": pa.array([split] * len(y)),
            "pixels": pa.FixedSizeListArray.from_arrays(flat, D),
        }))
    names = _class_names(spec)
    meta = {"name": spec.name, "shape": shape,
            "num_classes": len(names) if names is not None else
            int(max(int(y.max()) for _, y in splits.values() if len(y)) + 1),
            "counts": {s: int(len(v[1])) for s, v in splits.items()}, "spec": asdict(spec),
            # source label of each class 0..K-1 (None: the labels are the source's own)
            "classes": list(spec.classes) if spec.classes is not None else None,
            # folder: the subfolder name of each class 0..K-1 (None for the other datasets)
            "class_names": names}
    write_parquet(pa.concat_tables(parts), path, {"dnc:dataset": meta})
    return meta


def read_split(path: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """X (N, *shape) float32 and y (N,) int64 of one split, plus the dataset metadata."""
    import torch

    try:
        meta = read_metadata(path, "dnc:dataset")
    except KeyError as e:
        raise BadInputError(f"{path}: no 'dnc:dataset' metadata: not a dataset file of this version; "
                            f"delete it and rerun prepare_dataset") from e
    table = read_table(path, {"label": "int", "pixels": "list", "split": "string"},
                       filters=[("split", "==", split)])
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows with split == {split!r}")
    X = table.column("pixels").combine_chunks().flatten().to_numpy().reshape(-1, *meta["shape"])
    y = table.column("label").to_numpy().astype(np.int64)
    return torch.from_numpy(X.copy()), torch.from_numpy(y), meta
