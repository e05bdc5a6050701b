"""Datasets as Parquet: offline real data (digits, MNIST-1D), synthetic mixtures, torchvision sets.

Dataset file schema (docs/schemas.md): one row per sample with ``index`` (int64, position in the
source split), ``label`` (int32), ``split`` ("train" / "test") and ``pixels``
(fixed_size_list<float32>[prod(shape)]); metadata ``dnc:dataset`` records the name, the sample
shape (e.g. [1, 28, 28]), the number of classes, the options used and, when ``classes`` selects a
subset (e.g. two digits for a K = 2 experiment), the source label of each class 0..K-1.

torchvision datasets are read from a local root through torchvision's own classes (their ``data``
and ``targets`` arrays, no per-sample transform loop) and downloaded only when asked and where the
network allows; otherwise the error names the root and how to obtain the files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dnc.io import BadInputError, read_metadata, read_table, write_parquet

if TYPE_CHECKING:  # torch is imported where it is used: the workflow parses without it
    import torch

__all__ = ["DatasetSpec", "load_splits", "prepare_dataset", "read_split", "sample_shape", "TORCHVISION"]

# name -> (torchvision class, folder under root that holds its files, how to obtain them)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", "the four idx files (train-images-idx3-ubyte, ...)"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw", "the four idx files"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "the extracted cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "the extracted cifar-100-python.tar.gz"),
    "svhn": ("SVHN", ".", "train_32x32.mat and test_32x32.mat"),
}
OFFLINE = ("digits", "mnist1d", "gaussian")
GAUSSIAN = {"K": 10, "dim": 20, "separation": 2.0, "n": 100}  # defaults of the gaussian mixture
# Shape of one sample as the loaders below return it (gaussian: (1, dim)); the workflow checks an
# architecture against it before any job runs.
SAMPLE_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "mnist": (1, 28, 28),
                 "fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
                 "svhn": (3, 32, 32)}


@dataclass(frozen=True)
class DatasetSpec:
    """What to load and how.

    Attributes:
        name: digits, mnist1d, gaussian, mnist, fashionmnist, cifar10, cifar100 or svhn.
        root: folder of the torchvision files (ignored by the offline datasets).
        download: let torchvision download into root where the network allows.
        n_per_class: keep the first n samples of every class of the train split (balanced).
        first_n: keep the first n train samples instead (not balanced); not with n_per_class.
        test_n_per_class: the same for the test split (None keeps all).
        standardize: z-score every feature with the train split's mean and std (constant
            features become 0).
        seed: seed of the synthetic data and of the digits train/test split.
        test_fraction: share of digits held out as test.
        gaussian: K, dim, separation (distance scale of the class means), n (per class, per split).
        classes: keep only these source labels, relabelled 0..len(classes)-1 in the order given
            (e.g. (3, 8): 3 -> 0, 8 -> 1); applied to both splits before the per-class subsets.
            None keeps every class.
    """

    name: str
    root: str = "resources/data"
    download: bool = False
    n_per_class: int | None = None
    first_n: int | None = None
    test_n_per_class: int | None = None
    standardize: bool = False
    seed: int = 0
    test_fraction: float = 0.2
    gaussian: dict = field(default_factory=lambda: dict(GAUSSIAN))
    classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in OFFLINE and self.name not in TORCHVISION:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of "
                             f"{sorted([*OFFLINE, *TORCHVISION])}")
        if self.n_per_class is not None and self.first_n is not None:
            raise ValueError("give n_per_class or first_n, not both")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"{self.name}: classes must name at least two distinct labels, "
                                 f"got {list(self.classes)}")
        unknown = sorted(set(self.gaussian) - set(GAUSSIAN))
        if unknown:
            raise ValueError(f"gaussian: unknown option(s) {unknown}; allowed: {sorted(GAUSSIAN)}")
        object.__setattr__(self, "gaussian", {**GAUSSIAN, **self.gaussian})


def sample_shape(spec: DatasetSpec) -> tuple[int, ...]:
    """Shape of one sample of the dataset, without loading it: (C, H, W) for images, (1, d) for
    vectors (mnist1d, gaussian)."""
    return (1, int(spec.gaussian["dim"])) if spec.name == "gaussian" else SAMPLE_SHAPES[spec.name]


Split = tuple[np.ndarray, np.ndarray]  # X (N, *shape) float32, y (N,) int64


def _digits(spec: DatasetSpec) -> dict[str, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(spec.seed).permutation(len(y))
    n_test = int(round(spec.test_fraction * len(y)))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return {"train": (X[train], y[train]), "test": (X[test], y[test])}


def _mnist1d(spec: DatasetSpec) -> dict[str, Split]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42 + spec.seed
    data = make_dataset(args)  # generated locally; never the package's download
    return {"train": (data["x"].astype(np.float32)[:, None], data["y"].astype(np.int64)),
            "test": (data["x_test"].astype(np.float32)[:, None], data["y_test"].astype(np.int64))}


def _gaussian(spec: DatasetSpec) -> dict[str, Split]:
    g = spec.gaussian
    rng = np.random.default_rng(spec.seed)
    mu = rng.standard_normal((g["K"], g["dim"])) * g["separation"] / np.sqrt(2)
    out = {}
    for split in ("train", "test"):
        y = np.repeat(np.arange(g["K"]), g["n"])
        X = mu[y] + rng.standard_normal((len(y), g["dim"]))
        out[split] = (X.astype(np.float32)[:, None], y.astype(np.int64))
    return out


def _torchvision(spec: DatasetSpec) -> dict[str, Split]:
    import torchvision.datasets as tvd

    cls_name, folder, what = TORCHVISION[spec.name]
    cls = getattr(tvd, cls_name)
    out = {}
    for split in ("train", "test"):
        kw = {"split": split} if spec.name == "svhn" else {"train": split == "train"}
        try:
            ds = cls(root=spec.root, download=spec.download, **kw)
        except (RuntimeError, OSError) as e:
            hint = ("download=true failed (no network here?)" if spec.download
                    else "set download: true where the network allows")
            raise FileNotFoundError(
                f"{spec.name}: no usable files under root {os.path.abspath(spec.root)!r} "
                f"(expected {what} in {os.path.join(spec.root, folder)!r}); {hint}, or copy the "
                f"files there from a machine that has them. torchvision said: {e}") from e
        X = np.asarray(ds.data)
        if X.ndim == 3:  # MNIST-like (N, H, W) -> (N, 1, H, W)
            X = X[:, None]
        elif spec.name in ("cifar10", "cifar100"):  # (N, H, W, C) -> (N, C, H, W)
            X = X.transpose(0, 3, 1, 2)
        y = np.asarray(ds.labels if spec.name == "svhn" else ds.targets, dtype=np.int64)
        out[split] = ((X.astype(np.float32) / 255.0), y)
    return out


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


def load_splits(spec: DatasetSpec) -> tuple[dict[str, Split], dict[str, np.ndarray]]:
    """Train and test arrays after subsetting and optional standardisation.

    Returns (splits, index) where index[split] is each kept sample's position in its source split
    (before any class selection, so rows can be traced back to the source data).
    """
    loader = {"digits": _digits, "mnist1d": _mnist1d, "gaussian": _gaussian}.get(spec.name, _torchvision)
    raw = loader(spec)
    splits, index = {}, {}
    for split, (X, y) in raw.items():
        pos = np.arange(len(y))
        if spec.classes is not None:
            X, y, pos = keep_classes(X, y, pos, spec.classes, spec.name, split)
        n = spec.n_per_class if split == "train" else spec.test_n_per_class
        first = spec.first_n if split == "train" else None
        X, _ = subset(X, y, n, first)
        pos, y = subset(pos, y, n, first)
        splits[split], index[split] = (X, y), pos
    if spec.standardize:
        Xtr = splits["train"][0].reshape(len(splits["train"][1]), -1)
        mean = Xtr.mean(0, dtype=np.float64)
        std = Xtr.std(0, dtype=np.float64)
        std[std == 0] = np.inf  # constant features map to 0
        for split, (X, y) in splits.items():
            flat = (X.reshape(len(y), -1) - mean) / std
            splits[split] = (flat.astype(np.float32).reshape(X.shape), y)
    return splits, index


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
    meta = {"name": spec.name, "shape": shape,
            "num_classes": int(max(int(s[1].max()) for s in splits.values()) + 1),
            "counts": {s: int(len(v[1])) for s, v in splits.items()}, "spec": asdict(spec),
            # source label of each class 0..K-1 (None: the labels are the source's own)
            "classes": list(spec.classes) if spec.classes is not None else None}
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
