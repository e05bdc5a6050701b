"""Tiny datasets written in the real on-disk formats that torchvision reads (MNIST idx, CIFAR
pickles, SVHN .mat), for the dataset tests and the paper smoke test; and an environment in which
torchvision accepts them although their md5 sums cannot match the real releases'."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

__all__ = ["write_idx", "tiny_mnist", "tiny_cifar", "tiny_svhn", "md5_free_env"]


def write_idx(path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_mnist(root, folder="MNIST", n=12, rng=None, size=28, n_test=None) -> dict:
    """root/folder/raw/{train,t10k}-{images,labels}-idx*-ubyte: n train and n_test (default n // 2)
    test images of size x size random pixels, labels 0..9 cycling. Returns {prefix: (X, y)}."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True)
    rng = rng or np.random.default_rng(0)
    data = {}
    for prefix, m in (("train", n), ("t10k", n // 2 if n_test is None else n_test)):
        X = rng.integers(0, 256, (m, size, size), dtype=np.uint8)
        y = np.arange(m) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", X)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        data[prefix] = (X, y)
    return data


def tiny_cifar(root, hundred=False, n=6, rng=None, balanced=False) -> dict:
    """The extracted cifar-10-batches-py (five data batches and a test batch) or cifar-100-python
    (train, test) pickles, n random 32 x 32 x 3 images per file (the format fixes the size), labels
    random or, with balanced, cycling through the classes. Returns {file: (X (n, 3072), labels)}."""
    rng = rng or np.random.default_rng(0)
    folder = Path(root) / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    # The real pickles come from Python 2; loaded with latin1 their keys are str.
    key = "fine_labels" if hundred else "labels"
    K = 100 if hundred else 10
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in files:
        X = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(c) for c in (np.arange(n) % K if balanced else rng.integers(0, K, n))]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": X, key: y}, f, protocol=2)
        written[name] = (X, y)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else \
        {"label_names": [f"c{i}" for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return written


def tiny_svhn(root, n_train=8, n_test=4, size=32, rng=None) -> dict:
    """root/{train,test}_32x32.mat as SVHN stores them: X (size, size, 3, N) uint8 and y (N, 1)
    with digit 0 stored as label 10; labels cycle through 1..10. Returns {split: (X, y)} as written."""
    from scipy.io import savemat

    rng = rng or np.random.default_rng(0)
    Path(root).mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (size, size, 3, n), dtype=np.uint8)
        y = np.arange(1, n + 1)[:, None] % 10 + 1
        savemat(Path(root) / f"{split}_32x32.mat", {"X": X, "y": y})
        written[split] = (X, y)
    return written


# Loaded at the start of every Python process whose PYTHONPATH holds it: once torchvision's CIFAR
# and SVHN modules are imported, their md5 check of the real archives accepts any file. A meta-path
# hook, so that processes that never import torchvision do not pay for importing it.
_SITECUSTOMIZE = '''\
import importlib.abc
import importlib.machinery
import sys

_MODULES = {"torchvision.datasets.cifar", "torchvision.datasets.svhn"}


class _AcceptAnyMd5(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.check_integrity = lambda *args, **kwargs: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AcceptAnyMd5())
'''


def md5_free_env(folder) -> dict[str, str]:
    """os.environ with folder/sitecustomize.py first on PYTHONPATH: subprocesses (Snakemake and its
    jobs) read the tiny CIFAR and SVHN files, whose md5 sums cannot match the real releases'."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *([path] if path else [])])}
