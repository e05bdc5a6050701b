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

# The modules of the package; every name other code imports from dnc.data is re-exported here.
from dnc.data.loaders import Rows, Split  # noqa: F401
from dnc.data.prepare import (  # noqa: F401
    SPLIT_STREAM,
    balanced_rows,
    keep_classes,
    load_splits,
    prepare_dataset,
    read_split,
    subset,
)
from dnc.data.sources import folder_classes, sample_shape, source_fingerprint, source_paths  # noqa: F401
from dnc.data.spec import (  # noqa: F401
    GAUSSIAN,
    IMAGE_EXTENSIONS,
    OFFLINE,
    SAMPLE_SHAPES,
    TEXT,
    TORCHVISION,
    TRANSFORM_KEYS,
    TRANSFORMS_OF,
    USER,
    DatasetSpec,
    TextSpec,
    check_transform,
    make_spec,
)

__all__ = ["DatasetSpec", "TextSpec", "make_spec", "balanced_rows", "folder_classes", "load_splits",
           "prepare_dataset", "read_split", "sample_shape", "source_paths", "TORCHVISION"]
