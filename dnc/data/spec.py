"""The dataset spec: names, defaults and options of every dataset kind, validated when built
(torch-free: the workflow builds specs while it parses)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
TEXT = "text"  # a text corpus cut into token windows, for causal language models (dnc.lm.corpus)
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
                             f"{sorted([*OFFLINE, *TORCHVISION, *USER, TEXT])}")
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


@dataclass(frozen=True)
class TextSpec:
    """A text corpus for causal language models (docs/language_models.md, dnc.lm.corpus).

    The corpus (path: one UTF-8 file, or a folder whose ``.txt`` files are read in name order, each
    whole, joined with a newline) is tokenized once as one sequence without special tokens by the
    tokenizer (a ``tokenizer.json`` file, or a folder holding one), cut after max_tokens tokens
    (None: all), and cut into consecutive non-overlapping windows of context tokens (a partial
    last window is dropped). The last test_fraction of the windows (rounded down) are the test
    split. In a window the hidden state at position t = 0 .. context - 2 is a sample whose label
    is the token at t + 1.
    """

    name: str
    path: str
    tokenizer: str
    context: int = 128
    max_tokens: int | None = None
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.name != TEXT:
            raise ValueError(f"TextSpec is the {TEXT!r} dataset kind, got name {self.name!r}")
        wanted = {"path": "a .txt file or a folder of them",
                  "tokenizer": "a tokenizer.json file or a folder holding one"}
        for key, what in wanted.items():
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"text: give {key} ({what})")
        _check_count("context", self.context)
        if self.context < 2:
            raise ValueError(f"text: context must be at least 2 tokens (a window of N tokens gives "
                             f"N - 1 samples), got {self.context}")
        if self.max_tokens is not None:
            _check_count("max_tokens", self.max_tokens)
        if isinstance(self.test_fraction, bool) or not 0 <= float(self.test_fraction) < 1:
            raise ValueError(f"text: test_fraction must be in [0, 1), got {self.test_fraction!r}")
        object.__setattr__(self, "test_fraction", float(self.test_fraction))


def make_spec(options: Mapping[str, Any]) -> DatasetSpec | TextSpec:
    """The spec of a ``datasets`` entry: TextSpec for ``name: text``, else DatasetSpec.
    Raises TypeError (an unknown option) or ValueError (a bad value)."""
    options = dict(options or {})
    return TextSpec(**options) if options.get("name") == TEXT else DatasetSpec(**options)
