"""The user's own data: an image folder (``folder``, decoded with the transform) and NumPy arrays
(``arrays``, an .npz checked before use)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dnc.data.loaders import Rows, Split, _fraction_split
from dnc.data.sources import _list_folder, _resized
from dnc.data.spec import DatasetSpec
from dnc.io import BadInputError


def _folder(spec: DatasetSpec) -> dict[str, Rows]:
    """Image paths and labels of root/train and root/test (else test_fraction of train, seeded);
    pos is the row's position in the sorted file list of the split's folder."""
    train_dir, test_dir = os.path.join(spec.root, "train"), os.path.join(spec.root, "test")
    if not os.path.isdir(train_dir):
        raise BadInputError(f"{train_dir}: no such folder (a folder dataset reads root/train/, and "
                            f"root/test/ where it exists, each with one subfolder of images per class; "
                            f"root is {os.path.abspath(spec.root)!r})")
    classes, files, y = _list_folder(train_dir)
    if os.path.isdir(test_dir):
        test_classes, test_files, test_y = _list_folder(test_dir)
        if test_classes != classes:
            raise BadInputError(f"{spec.root}: the classes of train/ and test/ differ: train/ has "
                                f"{classes}, test/ has {test_classes}")
        return {"train": (files, y, np.arange(len(y))), "test": (test_files, test_y, np.arange(len(test_y)))}
    train, test = _fraction_split(len(y), spec)
    return {"train": (files[train], y[train], train), "test": (files[test], y[test], test)}


def _center_crop(a: np.ndarray, crop: list[int], path: str) -> np.ndarray:
    """The centre crop (h, w) of an (H, W, ...) image, torchvision's offsets (rounded half)."""
    (H, W), (h, w) = a.shape[:2], crop
    if h > H or w > W:
        raise BadInputError(f"{path}: image of {H} x {W} (after resize) is smaller than "
                            f"transform.center_crop {h} x {w}")
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    return a[top:top + h, left:left + w]


def _decode_one(path: str, t: Mapping) -> np.ndarray:
    """One image as (H, W, c) uint8 after grayscale (else RGB), resize and center_crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if t.get("grayscale") else "RGB")
            size = _resized((im.height, im.width), t.get("resize"))
            if size != (im.height, im.width):
                im = im.resize((size[1], size[0]), Image.BILINEAR)  # PIL takes (w, h)
            a = np.asarray(im)
    except OSError as e:
        raise BadInputError(f"{path}: not a readable image ({e})") from e
    if "center_crop" in t:
        a = _center_crop(a, t["center_crop"], path)
    return a.reshape(a.shape[0], a.shape[1], -1)


def _decode_images(files: np.ndarray, t: Mapping) -> np.ndarray | None:
    """(N, C, H, W) float32 of the image files (N,) after the whole transform; None when N = 0.

    Each image is decoded once (threads: PIL releases the GIL while decoding) into one uint8
    stack; the channel selection, the scaling to [0, 1] and normalize then act on the stack.
    """
    from concurrent.futures import ThreadPoolExecutor

    if len(files) == 0:
        return None
    stack = None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, a in enumerate(pool.map(lambda f: _decode_one(f, t), files)):
            if stack is None:
                stack = np.empty((len(files), *a.shape), dtype=np.uint8)
            elif a.shape != stack.shape[1:]:
                raise BadInputError(f"{files[i]}: {a.shape[0]} x {a.shape[1]} after the transform, but "
                                    f"{files[0]} is {stack.shape[1]} x {stack.shape[2]}: images must end up "
                                    f"the same size; give transform.resize [h, w] or a center_crop")
            stack[i] = a
    X = _select_channels(stack.transpose(0, 3, 1, 2), t.get("channels"))
    X = X.astype(np.float32) / np.float32(255)  # as torchvision's ToTensor
    return _normalize(X, t["normalize"], "transform") if "normalize" in t else X


def _select_channels(X: np.ndarray, C: int | None) -> np.ndarray:
    """X (N, c, ...) with C channels: the single channel repeated, or the first C kept."""
    if C is None or C == X.shape[1]:
        return X
    return np.repeat(X, C, axis=1) if X.shape[1] == 1 else X[:, :C]


def _normalize(X: np.ndarray, norm: Mapping, where: str) -> np.ndarray:
    """(X - mean) / std per channel (axis 1 of X (N, C, ...)), in float32 as torchvision's
    Normalize; one value of each statistic applies to every channel."""
    mean, std = (np.asarray(norm[k], dtype=np.float32) for k in ("mean", "std"))
    if X.ndim < 2 or len(mean) not in (1, X.shape[1]):
        raise BadInputError(f"{where}: transform.normalize has {len(mean)} values per statistic, but the "
                            f"samples of shape {X.shape[1:]} have {X.shape[1] if X.ndim > 1 else 0} "
                            f"channel(s) on their first axis; give one value per channel or one")
    shape = (1, len(mean)) + (1,) * (X.ndim - 2)
    return (X - mean.reshape(shape)) / std.reshape(shape)


def _npz_array(npz: Any, name: str, path: str) -> np.ndarray:
    try:
        return npz[name]
    except (OSError, ValueError) as e:  # object arrays need pickle, which is refused
        raise BadInputError(f"{path}: array {name!r} cannot be read without pickle ({e}); store "
                            f"plain numeric arrays") from e


def _check_xy(x: np.ndarray, y: np.ndarray, split: str, path: str) -> Split:
    """x (N, ...) as float32 and y (N,) as int64, after checking they are usable."""
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{path}: labels y_{split} have dtype {y.dtype}, not integers; store each "
                            f"sample's class index 0..K-1 (e.g. y.astype(np.int64))")
    if y.ndim != 1:
        raise BadInputError(f"{path}: labels y_{split} have shape {y.shape}, expected (N,)")
    if len(y) == 0:
        raise BadInputError(f"{path}: y_{split} is empty")
    if y.min() < 0:
        raise BadInputError(f"{path}: labels y_{split} include {int(y.min())}; class indices are 0..K-1")
    real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool
    if not real:
        raise BadInputError(f"{path}: x_{split} has dtype {x.dtype}; inputs must be real numbers")
    if x.ndim < 2:
        raise BadInputError(f"{path}: x_{split} has shape {x.shape}; expected (N, ...) with at least "
                            f"one axis per sample (e.g. (N, 1) for scalars)")
    if len(x) != len(y):
        raise BadInputError(f"{path}: x_{split} has {len(x)} rows but y_{split} has {len(y)}; "
                            f"they must have one label per row")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _read_npz(npz: Any, path: str) -> dict[str, Split]:
    names = sorted(npz.files)
    missing = [a for a in ("x_train", "y_train") if a not in names]
    if missing:
        raise BadInputError(f"{path}: missing array(s) {missing}; it holds {names} (an arrays dataset "
                            f"needs x_train and y_train, optionally x_test and y_test)")
    test = [a for a in ("x_test", "y_test") if a in names]
    if len(test) == 1:
        other = "y_test" if test[0] == "x_test" else "x_test"
        raise BadInputError(f"{path}: {test[0]} without {other}; give both test arrays or neither")
    out = {s: _check_xy(_npz_array(npz, f"x_{s}", path), _npz_array(npz, f"y_{s}", path), s, path)
           for s in ("train", "test")[:1 + len(test) // 2]}
    if "test" in out and out["test"][0].shape[1:] != out["train"][0].shape[1:]:
        raise BadInputError(f"{path}: samples of x_test have shape {out['test'][0].shape[1:]}, those of "
                            f"x_train {out['train'][0].shape[1:]}; they must match")
    return out


def _arrays(spec: DatasetSpec) -> dict[str, Rows]:
    """x, y of the .npz (test arrays, else test_fraction of train, seeded); pos is the row in the
    source array."""
    path = spec.path
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file (an arrays dataset reads an .npz holding x_train, "
                            f"y_train and optionally x_test, y_test; np.savez(path, x_train=..., ...))")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BadInputError(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise BadInputError(f"{path}: a single array, not an .npz archive; write one with "
                            f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    with npz:
        splits = _read_npz(npz, path)
    if "test" in splits:
        return {s: (x, y, np.arange(len(y))) for s, (x, y) in splits.items()}
    x, y = splits["train"]
    train, test = _fraction_split(len(y), spec)
    return {"train": (x[train], y[train], train), "test": (x[test], y[test], test)}
