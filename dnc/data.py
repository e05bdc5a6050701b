"""Datasets as Parquet: offline real data (digits, MNIST-1D), synthetic mixtures, torchvision
sets, and the user's own data: an image folder (``folder``) or NumPy arrays (``arrays``).

Dataset file schema (docs/schemas.md): one row per sample with ``index`` (int64, position in the
source split), ``label`` (int32), ``split`` ("train" / "test") and ``pixels``
(fixed_size_list<float32>[prod(shape)]); metadata ``dnc:dataset`` records the name, the sample
shape (e.g. [1, 28, 28]), the number of classes, the options used, when ``classes`` selects a
subset (e.g. two digits for a K = 2 experiment) the source label of each class 0..K-1, and for an
image folder the name (subfolder) of each class 0..K-1.

torchvision datasets are read from a local root through torchvision's own classes (their ``data``
and ``targets`` arrays, no per-sample transform loop) and downloaded only when asked and where the
network allows; otherwise the error names the root and how to obtain the files.

Image folders follow torchvision's ImageFolder layout and conventions (classes = sorted subfolder
names, images decoded as RGB, transforms with torchvision's semantics), so the rows are the tensors
a model trained with ImageFolder saw. Label-level selection (``classes``, ``max_per_class``,
``n_per_class``) happens on the file list, so only the images kept are decoded.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from dnc.io import BadInputError, read_metadata, read_table, write_parquet

if TYPE_CHECKING:  # torch is imported where it is used: the workflow parses without it
    import torch

__all__ = ["DatasetSpec", "balanced_rows", "folder_classes", "load_splits", "prepare_dataset",
           "read_split", "sample_shape", "source_paths", "TORCHVISION"]

# name -> (torchvision class, folder under root that holds its files, how to obtain them)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", "the four idx files (train-images-idx3-ubyte, ...)"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw", "the four idx files"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "the extracted cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "the extracted cifar-100-python.tar.gz"),
    "svhn": ("SVHN", ".", "train_32x32.mat and test_32x32.mat"),
}
OFFLINE = ("digits", "mnist1d", "gaussian")
USER = ("folder", "arrays")  # the user's own data: an ImageFolder tree, an .npz of arrays
GAUSSIAN = {"K": 10, "dim": 20, "separation": 2.0, "n": 100}  # defaults of the gaussian mixture
# Shape of one sample as the loaders below return it (gaussian: (1, dim)); the workflow checks an
# architecture against it before any job runs.
SAMPLE_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "mnist": (1, 28, 28),
                 "fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
                 "svhn": (3, 32, 32)}
# File endings read as images (torchvision's IMG_EXTENSIONS), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Transform keys, in the order they are applied; the arrays kind takes only normalize (its inputs
# are fed to the model as they are, with no pixel grid to resize or crop).
TRANSFORM_KEYS = ("grayscale", "resize", "center_crop", "channels", "normalize")
TRANSFORMS_OF = {"folder": TRANSFORM_KEYS, "arrays": ("normalize",)}


@dataclass(frozen=True)
class DatasetSpec:
    """What to load and how.

    Attributes:
        name: digits, mnist1d, gaussian, mnist, fashionmnist, cifar10, cifar100, svhn, or the
            user's own data: ``folder`` (an image folder below root) or ``arrays`` (an .npz at path).
        root: folder of the torchvision files (ignored by the offline datasets); for ``folder``
            the image folder, holding ``train/`` and optionally ``test/``, each with one subfolder
            of images per class (ImageFolder layout; classes = sorted subfolder names, the same in
            both splits).
        path: the .npz file of ``arrays`` (only there): ``x_train`` (N, ...) of any numeric dtype
            and shape, ``y_train`` (N,) integer labels >= 0, optionally ``x_test``, ``y_test``.
        download: let torchvision download into root where the network allows.
        n_per_class: keep the first n samples of every class of the train split (balanced).
        first_n: keep the first n train samples instead (not balanced); not with n_per_class.
        test_n_per_class: the same for the test split (None keeps all).
        max_per_class: keep at most this many samples of every class in both splits, drawn at
            random (seeded by seed, per split) and kept in source order; not with n_per_class,
            first_n or test_n_per_class.
        standardize: z-score every feature with the train split's mean and std (constant
            features become 0).
        seed: seed of the synthetic data, of the train/test split (digits; folder and arrays
            without a test split) and of max_per_class.
        test_fraction: share held out as test by digits, and by folder and arrays without a test
            split.
        gaussian: K, dim, separation (distance scale of the class means), n (per class, per split).
        classes: keep only these source labels, relabelled 0..len(classes)-1 in the order given
            (e.g. (3, 8): 3 -> 0, 8 -> 1); applied to both splits before the per-class subsets.
            None keeps every class.
        transform: for ``folder``, applied to every image in this order with torchvision's
            semantics: ``grayscale`` (bool, one channel by ITU-R 601 luma; images are otherwise
            decoded as RGB), ``resize`` (int: the shorter edge, keeping the aspect ratio; [h, w]:
            that size; bilinear), ``center_crop`` (int or [h, w]), ``channels`` (int C: repeat a
            single channel C times or keep the first C), ``normalize`` ({mean: [...], std: [...]},
            one value per channel or one for all, applied last to pixels scaled to [0, 1]). For
            ``arrays`` only ``normalize`` applies (to the values as stored, channel axis 1). None
            for the other datasets.
    """

    name: str
    root: str = "resources/data"
    path: str | None = None
    download: bool = False
    n_per_class: int | None = None
    first_n: int | None = None
    test_n_per_class: int | None = None
    max_per_class: int | None = None
    standardize: bool = False
    seed: int = 0
    test_fraction: float = 0.2
    gaussian: dict = field(default_factory=lambda: dict(GAUSSIAN))
    classes: tuple[int, ...] | None = None
    transform: dict | None = None

    def __post_init__(self) -> None:
        if self.name not in OFFLINE and self.name not in TORCHVISION and self.name not in USER:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of "
                             f"{sorted([*OFFLINE, *TORCHVISION, *USER])}")
        self._check_source()
        if self.n_per_class is not None and self.first_n is not None:
            raise ValueError("give n_per_class or first_n, not both")
        if self.max_per_class is not None:
            _check_count("max_per_class", self.max_per_class)
            both = [k for k in ("n_per_class", "first_n", "test_n_per_class") if getattr(self, k) is not None]
            if both:
                raise ValueError(f"{self.name}: give max_per_class or {both[0]}, not both "
                                 f"(max_per_class subsamples both splits)")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"{self.name}: classes must name at least two distinct labels, "
                                 f"got {list(self.classes)}")
        unknown = sorted(set(self.gaussian) - set(GAUSSIAN))
        if unknown:
            raise ValueError(f"gaussian: unknown option(s) {unknown}; allowed: {sorted(GAUSSIAN)}")
        object.__setattr__(self, "gaussian", {**GAUSSIAN, **self.gaussian})
        object.__setattr__(self, "transform", check_transform(self.name, self.transform))

    def _check_source(self) -> None:
        """The kind-specific required keys: folder needs root, arrays needs path (and only it)."""
        if self.name == "arrays" and not (isinstance(self.path, str) and self.path):
            raise ValueError("arrays: give path, the .npz file holding x_train, y_train "
                             "(and optionally x_test, y_test)")
        if self.name != "arrays" and self.path is not None:
            raise ValueError(f"{self.name}: path is the .npz file of the arrays kind; "
                             f"{'give root (the image folder)' if self.name == 'folder' else 'remove it'}")
        if self.name == "folder" and not (isinstance(self.root, str) and self.root):
            raise ValueError("folder: give root, the folder holding train/ (and optionally test/)")


def _check_count(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _size(key: str, value: Any) -> int | list[int]:
    """A resize or crop size: a positive int, or [h, w] of positive ints."""
    if isinstance(value, list | tuple) and len(value) == 2:
        for v in value:
            _check_count(f"transform.{key}", v)
        return [int(v) for v in value]
    if isinstance(value, list | tuple):
        raise ValueError(f"transform.{key} must be an int or [h, w], got {list(value)}")
    _check_count(f"transform.{key}", value)
    return int(value)


def _normalize_option(value: Any) -> dict[str, list[float]]:
    """{mean: [...], std: [...]}: equal lengths, std > 0."""
    if not isinstance(value, Mapping) or set(value) != {"mean", "std"}:
        raise ValueError(f"transform.normalize must be {{mean: [...], std: [...]}}, got {value!r}")
    out = {}
    for key in ("mean", "std"):
        v = value[key]
        v = list(v) if isinstance(v, list | tuple) else [v]
        if not v or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            raise ValueError(f"transform.normalize.{key} must be a non-empty list of numbers, "
                             f"got {value[key]!r}")
        out[key] = [float(x) for x in v]
    if len(out["mean"]) != len(out["std"]):
        raise ValueError(f"transform.normalize: mean has {len(out['mean'])} values, std {len(out['std'])}")
    if min(out["std"]) <= 0:
        raise ValueError(f"transform.normalize.std must be positive, got {out['std']}")
    return out


def check_transform(name: str, transform: Mapping | None) -> dict | None:
    """The transform of dataset kind name, validated and in canonical form (center_crop as [h, w],
    normalize as lists of floats); None when there is none. Raises ValueError naming the key."""
    if not transform:
        return None
    if not isinstance(transform, Mapping):
        raise ValueError(f"{name}: transform must be a mapping of {list(TRANSFORM_KEYS)}, got {transform!r}")
    unknown = sorted(set(transform) - set(TRANSFORM_KEYS))
    if unknown:
        raise ValueError(f"{name}: transform: unknown key(s) {unknown}; allowed: {list(TRANSFORM_KEYS)}")
    allowed = TRANSFORMS_OF.get(name, ())
    refused = [k for k in transform if k not in allowed]
    if refused:
        raise ValueError(f"{name}: transform {refused} does not apply to this dataset; "
                         f"folder takes {list(TRANSFORMS_OF['folder'])}, "
                         f"arrays {list(TRANSFORMS_OF['arrays'])}")
    out: dict[str, Any] = {}
    if "grayscale" in transform:
        if not isinstance(transform["grayscale"], bool):
            raise ValueError(f"transform.grayscale must be true or false, got {transform['grayscale']!r}")
        out["grayscale"] = transform["grayscale"]
    if "resize" in transform:
        out["resize"] = _size("resize", transform["resize"])
    if "center_crop" in transform:
        crop = _size("center_crop", transform["center_crop"])
        out["center_crop"] = [crop, crop] if isinstance(crop, int) else crop
    if "channels" in transform:
        _check_count("transform.channels", transform["channels"])
        out["channels"] = int(transform["channels"])
    if "normalize" in transform:
        out["normalize"] = _normalize_option(transform["normalize"])
    if name == "folder":
        _check_folder_channels(out)
    return out


def _decoded_channels(transform: Mapping | None) -> int:
    """Channels of a decoded folder image: 1 with grayscale, else 3 (RGB, as ImageFolder)."""
    return 1 if (transform or {}).get("grayscale") else 3


def _check_folder_channels(t: Mapping) -> None:
    decoded = _decoded_channels(t)
    C = t.get("channels", decoded)
    if decoded > 1 and C > decoded:
        raise ValueError(f"transform.channels = {C}: images are decoded as RGB (3 channels); only a "
                         f"single channel (grayscale: true) can be repeated")
    n = len(t["normalize"]["mean"]) if "normalize" in t else 1
    if n not in (1, C):
        raise ValueError(f"transform.normalize has {n} values per statistic for {C} channel(s); "
                         f"give {C} or 1")


def folder_classes(spec: DatasetSpec) -> list[str]:
    """Class names of an image folder dataset: the sorted subfolders of root/train (class k is the
    k-th name, as in torchvision's ImageFolder)."""
    return _class_dirs(os.path.join(spec.root, "train"))


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image, read from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as e:
        raise BadInputError(f"{path}: not a readable image ({e})") from e


def _resized(hw: tuple[int, int], resize: int | list[int] | None) -> tuple[int, int]:
    """(height, width) after resize, as torchvision computes it (an int sets the shorter edge,
    the longer edge is truncated from the aspect ratio)."""
    if resize is None:
        return hw
    if isinstance(resize, list):
        return resize[0], resize[1]
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    return (new_long, resize) if w <= h else (resize, new_long)


def _folder_shape(spec: DatasetSpec, first_image: str) -> tuple[int, int, int]:
    """(C, H, W) of a folder sample, from the first image's size and the transform."""
    t = spec.transform or {}
    h, w = _resized(_image_size(first_image), t.get("resize"))
    if "center_crop" in t:
        h, w = t["center_crop"]
    return t.get("channels", _decoded_channels(t)), h, w


def _npz_shape(path: str, array: str) -> tuple[int, ...]:
    """Shape of one array of an .npz, read from the header of its member (no data loaded)."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{array}.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            return tuple(int(n) for n in read(f)[0])
    except KeyError as e:
        raise BadInputError(f"{path}: missing array {array!r} (an arrays dataset needs x_train and "
                            f"y_train, optionally x_test and y_test)") from e
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BadInputError(f"{path}: not a readable .npz file ({e})") from e


def sample_shape(spec: DatasetSpec) -> tuple[int, ...] | None:
    """Shape of one sample of the dataset, without loading it: (C, H, W) for images, (1, d) for
    vectors (mnist1d, gaussian), x_train.shape[1:] for arrays (from the .npz header), and for a
    folder (C, H, W) of its first image after the transform.

    None when the arrays file or the folder's train/ does not exist (yet: another rule of the
    workflow may write it); the caller then skips its shape check. A source that exists but cannot
    be used (no x_train, no images) raises BadInputError naming it.
    """
    if spec.name == "gaussian":
        return 1, int(spec.gaussian["dim"])
    if spec.name == "arrays":
        return _npz_shape(spec.path, "x_train")[1:] if os.path.isfile(spec.path) else None
    if spec.name == "folder":
        train = os.path.join(spec.root, "train")
        if not os.path.isdir(train):
            return None
        first = _first_image(train)
        if first is None:
            _list_folder(train)  # raises, naming the folder: it holds no images
        return _folder_shape(spec, first)
    return SAMPLE_SHAPES[spec.name]


def source_paths(spec: DatasetSpec) -> list[str]:
    """The files or folders the dataset is read from, for a workflow to declare as inputs: the
    .npz of arrays, root/train (and root/test where it exists) of folder; [] for the others
    (their files are fixed releases, read or generated by the loaders)."""
    if spec.name == "arrays":
        return [spec.path]
    if spec.name == "folder":
        train, test = os.path.join(spec.root, "train"), os.path.join(spec.root, "test")
        return [train, test] if os.path.isdir(test) else [train]
    return []


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


def _class_dirs(folder: str) -> list[str]:
    """Sorted names of the class subfolders of folder (ImageFolder's class order)."""
    if not os.path.isdir(folder):
        raise BadInputError(f"{folder}: no such folder (a folder dataset reads root/train/, and "
                            f"root/test/ where it exists, each with one subfolder of images per class)")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not names:
        raise BadInputError(f"{folder}: no class subfolders (ImageFolder layout: one subfolder of "
                            f"images per class, e.g. {folder}/cat/1.png)")
    return names


def _images_below(folder: str) -> list[str]:
    """Image files below folder, in the order ImageFolder lists them (sorted walk, sorted names)."""
    return [os.path.join(d, f) for d, _, names in sorted(os.walk(folder, followlinks=True))
            for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]


def source_fingerprint(spec: DatasetSpec) -> str | None:
    """A digest of an image folder's files (relative path, size, modification time), for a
    workflow param: a folder's own modification time does not change when an image in it is
    rewritten, so declaring the folder as an input would miss that. None for the other kinds."""
    if spec.name != "folder" or not os.path.isdir(spec.root):
        return None
    digest = hashlib.sha1()
    for path in _images_below(spec.root):
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, spec.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _first_image(folder: str) -> str | None:
    """The first image of the sorted listing of folder (the first class that has one); None if
    there is none."""
    for c in _class_dirs(folder):
        found = _images_below(os.path.join(folder, c))
        if found:
            return found[0]
    return None


def _list_folder(folder: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, image paths (N,) object, labels (N,) int64) of one split's folder."""
    classes = _class_dirs(folder)
    files, labels, empty = [], [], []
    for k, c in enumerate(classes):
        found = _images_below(os.path.join(folder, c))
        if not found:
            empty.append(c)
        files += found
        labels += [k] * len(found)
    if not files:
        raise BadInputError(f"{folder}: no images in any of its class folders {classes} "
                            f"(image files end in {' '.join(IMAGE_EXTENSIONS)})")
    if empty:
        raise BadInputError(f"{folder}: class folder(s) {empty} hold no images (every class needs "
                            f"at least one; image files end in {' '.join(IMAGE_EXTENSIONS)})")
    return classes, np.array(files, dtype=object), np.array(labels, dtype=np.int64)


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
