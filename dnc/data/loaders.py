"""Loaders of the built-in datasets: digits, MNIST-1D, the Gaussian mixture and torchvision sets."""

from __future__ import annotations

import os

import numpy as np

from dnc.data.spec import TORCHVISION, DatasetSpec

Split = tuple[np.ndarray, np.ndarray]  # X (N, *shape) float32, y (N,) int64
# X (N, ...), y (N,), pos (N,): rows with their position in the source (a folder's sorted file
# list, an .npz array); X of a folder is the (N,) object array of image paths until decoded.
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _fraction_split(n: int, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) positions of n source rows: test_fraction of them at random (seed)."""
    perm = np.random.default_rng(spec.seed).permutation(n)
    n_test = int(round(spec.test_fraction * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _digits(spec: DatasetSpec) -> dict[str, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    train, test = _fraction_split(len(y), spec)
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
