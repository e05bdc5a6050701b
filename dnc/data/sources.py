"""What the workflow asks of a dataset without loading it: the sample shape, the source files,
a fingerprint of an image folder; and the listing of an image folder (ImageFolder order)."""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from dnc.data.spec import IMAGE_EXTENSIONS, SAMPLE_SHAPES, DatasetSpec, TextSpec, _decoded_channels
from dnc.io import BadInputError
from dnc.lm.files import corpus_files, tokenizer_file


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


def sample_shape(spec: DatasetSpec | TextSpec) -> tuple[int, ...] | None:
    """Shape of one sample of the dataset, without loading it: (C, H, W) for images, (1, d) for
    vectors (mnist1d, gaussian), x_train.shape[1:] for arrays (from the .npz header), and for a
    folder (C, H, W) of its first image after the transform.

    None when the arrays file or the folder's train/ does not exist (yet: another rule of the
    workflow may write it); the caller then skips its shape check. A source that exists but cannot
    be used (no x_train, no images) raises BadInputError naming it.
    """
    if isinstance(spec, TextSpec):
        return (spec.context,)  # a window of token ids
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


def source_paths(spec: DatasetSpec | TextSpec) -> list[str]:
    """The files or folders the dataset is read from, for a workflow to declare as inputs: the
    .npz of arrays, root/train (and root/test where it exists) of folder, the corpus files and the
    tokenizer.json of text; [] for the others (their files are fixed releases, read or generated
    by the loaders)."""
    if isinstance(spec, TextSpec):
        return [*corpus_files(spec.path), tokenizer_file(spec.tokenizer)]
    if spec.name == "arrays":
        return [spec.path]
    if spec.name == "folder":
        train, test = os.path.join(spec.root, "train"), os.path.join(spec.root, "test")
        return [train, test] if os.path.isdir(test) else [train]
    return []


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


def source_fingerprint(spec: DatasetSpec | TextSpec) -> str | None:
    """A digest of an image folder's files (relative path, size, modification time), for a
    workflow param: a folder's own modification time does not change when an image in it is
    rewritten, so declaring the folder as an input would miss that. None for the other kinds."""
    if isinstance(spec, TextSpec) or spec.name != "folder" or not os.path.isdir(spec.root):
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
