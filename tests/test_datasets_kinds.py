"""The user's own data: image folders (ImageFolder layout, written here with PIL) and .npz arrays,
their transforms, balanced subsampling, the Parquet they prepare, their sample shapes and every
bad input named with its file and problem."""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dnc.data import (
    DatasetSpec,
    balanced_rows,
    load_splits,
    prepare_dataset,
    read_split,
    sample_shape,
    source_paths,
)
from dnc.io import BadInputError

H, W = 10, 12  # every image written below is H x W unless a test says otherwise
# class -> (PIL mode, number of images); "c" also keeps one image in a nested subfolder
LAYOUT = {"a": ("RGB", 3), "b": ("L", 2), "c": ("RGB", 2)}


def write_image(path: Path, rng, mode="RGB", size=(H, W)) -> np.ndarray:
    """A random PNG at path; returns its pixels (h, w, 3) or (h, w) uint8."""
    shape = size if mode == "L" else (*size, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def write_split(folder: Path, rng, layout=LAYOUT) -> tuple[list[np.ndarray], list[int]]:
    """Images of one split in ImageFolder layout, plus a stray text file; returns their pixels and
    labels in ImageFolder's order (sorted classes, then the sorted walk of each class folder)."""
    pixels, labels = [], []
    for k, (c, (mode, n)) in enumerate(sorted(layout.items())):
        names = [f"{c}/img{i}.png" for i in range(n - 1)]
        names.append(f"{c}/sub/deep.png" if c == "c" else f"{c}/img{n - 1}.png")
        for name in names:
            pixels.append(write_image(folder / name, rng, mode))
            labels.append(k)
    first = sorted(layout)[0]
    (folder / first / "readme.txt").write_text("not an image")
    return pixels, labels


def as_rgb_float(pixels: np.ndarray) -> np.ndarray:
    """(3, h, w) float32 in [0, 1]: what ImageFolder + ToTensor make of one image."""
    rgb = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
    return rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255)


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    train = write_split(tmp_path / "imgs" / "train", rng)
    test = write_split(tmp_path / "imgs" / "test", rng)
    return tmp_path / "imgs", train, test


def test_folder_rows_are_the_decoded_images_in_imagefolder_order(tree, tmp_path):
    root, (pixels, labels), (test_pixels, test_labels) = tree
    splits, index = load_splits(DatasetSpec("folder", root=str(root)))
    X, y = splits["train"]
    assert X.shape == (7, 3, H, W) and X.dtype == np.float32
    np.testing.assert_array_equal(X, np.stack([as_rgb_float(p) for p in pixels]))
    assert y.tolist() == labels == [0, 0, 0, 1, 1, 2, 2] and index["train"].tolist() == list(range(7))
    np.testing.assert_array_equal(splits["test"][0], np.stack([as_rgb_float(p) for p in test_pixels]))
    assert splits["test"][1].tolist() == test_labels


def test_prepared_folder_reads_back_with_class_names_and_its_sample_shape(tree, tmp_path):
    root, (pixels, labels), _ = tree
    spec = DatasetSpec("folder", root=str(root), transform={"grayscale": True, "resize": [6, 8]})
    meta = prepare_dataset(spec, tmp_path / "f.parquet")
    X, y, m = read_split(tmp_path / "f.parquet", "train")
    assert tuple(X.shape) == (7, 1, 6, 8) and m["shape"] == [1, 6, 8] == meta["shape"]
    assert sample_shape(spec) == (1, 6, 8)
    assert y.tolist() == labels and m["class_names"] == ["a", "b", "c"] and m["num_classes"] == 3
    assert m["counts"] == {"train": 7, "test": 7} and m["spec"]["transform"] == spec.transform
    # a class subset names its classes in the order given
    sub = DatasetSpec("folder", root=str(root), classes=[2, 0])
    m2 = prepare_dataset(sub, tmp_path / "g.parquet")
    assert m2["class_names"] == ["c", "a"] and m2["num_classes"] == 2 and m2["counts"]["train"] == 5


def torchvision_reference(folder: Path, steps) -> tuple[np.ndarray, list[int]]:
    """The same folder through torchvision's ImageFolder and transforms: the tensors a model
    trained with them saw."""
    import torch
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    return torch.stack([x for x, _ in ds]).numpy(), [k for _, k in ds]


@pytest.mark.parametrize("transform", [
    {"resize": 8, "center_crop": 6, "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}},
    {"grayscale": True, "channels": 3, "resize": [5, 7]},
    {"grayscale": True, "center_crop": [4, 6], "normalize": {"mean": [0.5], "std": [0.25]}},
])
def test_folder_transforms_match_torchvision(tree, transform):
    from torchvision import transforms as T

    root = tree[0]
    steps = []
    if transform.get("grayscale"):
        steps.append(T.Grayscale(num_output_channels=transform.get("channels", 1)))
    if "resize" in transform:
        steps.append(T.Resize(transform["resize"]))
    if "center_crop" in transform:
        steps.append(T.CenterCrop(transform["center_crop"]))
    steps.append(T.ToTensor())
    if "normalize" in transform:
        steps.append(T.Normalize(**transform["normalize"]))
    ref, labels = torchvision_reference(root / "train", steps)
    spec = DatasetSpec("folder", root=str(root), transform=transform)
    X, y = load_splits(spec)[0]["train"]
    assert X.shape == ref.shape and y.tolist() == labels
    np.testing.assert_allclose(X, ref, rtol=1e-6, atol=1e-6)
    assert sample_shape(spec) == X.shape[1:]
    if transform.get("resize") == 8:  # the shorter edge 10 -> 8, the longer 12 -> int(8 * 12 / 10)
        resized = load_splits(DatasetSpec("folder", root=str(root), transform={"resize": 8}))[0]
        assert resized["train"][0].shape[2:] == (8, 9)


def test_channels_keep_the_first_and_normalize_per_channel(tree):
    root, (pixels, _), _ = tree
    X, _ = load_splits(DatasetSpec("folder", root=str(root), transform={"channels": 1}))[0]["train"]
    np.testing.assert_array_equal(X[:, 0], np.stack([as_rgb_float(p)[0] for p in pixels]))
    mean, std = [0.1, 0.2, 0.3], [0.5, 1.0, 2.0]
    Z, _ = load_splits(DatasetSpec("folder", root=str(root),
                                   transform={"normalize": {"mean": mean, "std": std}}))[0]["train"]
    for c in range(3):
        ref = np.stack([(as_rgb_float(p)[c].astype(np.float64) - mean[c]) / std[c] for p in pixels])
        np.testing.assert_allclose(Z[:, c], ref, atol=1e-6)


def test_folder_without_test_is_split_by_test_fraction_with_the_seed(tmp_path):
    rng = np.random.default_rng(1)
    pixels, labels = write_split(tmp_path / "r" / "train", rng, {"x": ("RGB", 6), "y": ("L", 4)})
    spec = DatasetSpec("folder", root=str(tmp_path / "r"), test_fraction=0.3, seed=5)
    splits, index = load_splits(spec)
    train, test = index["train"], index["test"]
    assert len(test) == 3 and len(train) == 7 and sorted([*train, *test]) == list(range(10))
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()  # source order
    for split, rows in (("train", train), ("test", test)):
        np.testing.assert_array_equal(splits[split][0], np.stack([as_rgb_float(pixels[i]) for i in rows]))
        assert splits[split][1].tolist() == [labels[i] for i in rows]
    assert load_splits(spec)[1]["test"].tolist() == test.tolist()
    perm = np.random.default_rng(5).permutation(10)  # the digits rule: the first 30 % are test
    assert test.tolist() == sorted(perm[:3].tolist())
    assert source_paths(spec) == [str(tmp_path / "r" / "train")]


def test_max_per_class_is_balanced_seeded_and_in_source_order(tmp_path):
    y = np.repeat([0, 1, 2], [50, 3, 40])
    np.random.default_rng(0).shuffle(y)
    x = np.arange(len(y), dtype=np.float64)[:, None] * np.ones((1, 4))
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:60], y_test=y[:60])
    spec = DatasetSpec("arrays", path=str(tmp_path / "d.npz"), max_per_class=5, seed=3)
    splits, index = load_splits(spec)
    for split, n in (("train", len(y)), ("test", 60)):
        Xs, ys = splits[split]
        counts = np.bincount(ys, minlength=3)
        assert counts[1] == min(5, (y[:n] == 1).sum()) and counts[0] == counts[2] == 5
        assert (np.diff(index[split]) > 0).all()
        np.testing.assert_array_equal(ys, y[index[split]])
        np.testing.assert_array_equal(Xs[:, 0], index[split])  # the rows travel with their labels
    assert load_splits(spec)[1]["train"].tolist() == index["train"].tolist()
    other = load_splits(DatasetSpec("arrays", path=str(tmp_path / "d.npz"), max_per_class=5, seed=4))[1]
    assert other["train"].tolist() != index["train"].tolist()
    # every row of a class is equally likely: over many seeds each of class 0's rows is drawn ~ 5/50
    draws = np.concatenate([balanced_rows(y, 5, s, "train") for s in range(400)])
    freq = np.bincount(draws, minlength=len(y))[y == 0] / 400
    assert abs(freq.mean() - 0.1) < 1e-12 and freq.min() > 0.04 and freq.max() < 0.17


def test_max_per_class_on_a_folder_decodes_the_kept_images(tree):
    root, (pixels, labels), _ = tree
    splits, index = load_splits(DatasetSpec("folder", root=str(root), max_per_class=1, seed=2))
    X, y = splits["train"]
    assert y.tolist() == [0, 1, 2] and splits["test"][1].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(X, np.stack([as_rgb_float(pixels[i]) for i in index["train"]]))


def test_arrays_of_any_shape_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 2, 3, 5)), rng.integers(0, 4, 20).astype(np.int16)
    xt, yt = rng.standard_normal((8, 2, 3, 5)), rng.integers(0, 4, 8)
    np.savez_compressed(tmp_path / "a.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    spec = DatasetSpec("arrays", path=str(tmp_path / "a.npz"))
    assert sample_shape(spec) == (2, 3, 5) and source_paths(spec) == [str(tmp_path / "a.npz")]
    meta = prepare_dataset(spec, tmp_path / "a.parquet")
    X, Y, m = read_split(tmp_path / "a.parquet", "train")
    assert tuple(X.shape) == (20, 2, 3, 5) and m["shape"] == [2, 3, 5] and m["class_names"] is None
    np.testing.assert_array_equal(X.numpy(), x.astype(np.float32))
    assert Y.tolist() == y.tolist() and meta["num_classes"] == int(max(y.max(), yt.max())) + 1
    Xt, Yt, _ = read_split(tmp_path / "a.parquet", "test")
    np.testing.assert_array_equal(Xt.numpy(), xt.astype(np.float32))
    assert Yt.tolist() == yt.tolist()
    # vectors, no test arrays: split by test_fraction; normalize per feature on axis 1
    v, w = rng.standard_normal((30, 3)), rng.integers(0, 3, 30)
    np.savez(tmp_path / "v.npz", x_train=v, y_train=w)
    norm = {"mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]}
    splits, index = load(name="arrays", path=str(tmp_path / "v.npz"), transform={"normalize": norm})
    assert len(index["test"]) == 6 and sorted([*index["train"], *index["test"]]) == list(range(30))
    ref = (v[index["test"]] - np.array(norm["mean"])) / np.array(norm["std"])
    np.testing.assert_allclose(splits["test"][0], ref, rtol=1e-6)
    assert splits["test"][1].tolist() == w[index["test"]].tolist()


def test_sample_shape_is_none_for_a_source_not_written_yet(tmp_path):
    assert sample_shape(DatasetSpec("arrays", path=str(tmp_path / "later.npz"))) is None
    assert sample_shape(DatasetSpec("folder", root=str(tmp_path / "later"))) is None


def test_spec_survives_the_workflow_params_roundtrip():
    from dnc.config import canonical

    spec = DatasetSpec("folder", root="imgs", max_per_class=3,
                       transform={"normalize": {"std": [0.5], "mean": [0.5]}, "center_crop": 4, "resize": 8})
    assert spec.transform["center_crop"] == [4, 4]
    assert DatasetSpec(**canonical(asdict(spec))) == spec
    assert DatasetSpec("folder", root="imgs", transform={}).transform is None


def test_parsing_a_user_dataset_imports_no_torch(tree, tmp_path):
    np.savez(tmp_path / "a.npz", x_train=np.zeros((3, 2)), y_train=np.arange(3))
    code = (f"import sys; from dnc.data import DatasetSpec, sample_shape; "
            f"print(sample_shape(DatasetSpec('folder', root={str(tree[0])!r}, transform={{'resize': 8}})), "
            f"sample_shape(DatasetSpec('arrays', path={str(tmp_path / 'a.npz')!r}))); "
            f"assert 'torch' not in sys.modules and 'torchvision' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "(3, 8, 9) (2,)"


# ---- bad inputs: each error names the file or folder and the problem --------------------------


def load(**spec):
    return load_splits(DatasetSpec(**spec))


def test_folder_errors_name_the_folder_and_the_problem(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(BadInputError, match=r"nowhere/train: no such folder .*one subfolder of images"):
        load(name="folder", root=str(tmp_path / "nowhere"))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    write_image(tmp_path / "flat" / "train" / "x.png", rng)
    with pytest.raises(BadInputError, match=r"flat/train: no class subfolders"):
        load(name="folder", root=str(tmp_path / "flat"))
    for c in ("cat", "dog"):
        (tmp_path / "txt" / "train" / c).mkdir(parents=True)
        (tmp_path / "txt" / "train" / c / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match=r"txt/train: no images in any of its class folders \['cat'"):
        load(name="folder", root=str(tmp_path / "txt"))
    with pytest.raises(BadInputError, match=r"txt/train: no images"):  # at parse time too
        sample_shape(DatasetSpec("folder", root=str(tmp_path / "txt")))
    write_image(tmp_path / "txt" / "train" / "cat" / "1.png", rng)
    with pytest.raises(BadInputError, match=r"txt/train: class folder\(s\) \['dog'\] hold no images"):
        load(name="folder", root=str(tmp_path / "txt"))


def test_classes_differing_between_train_and_test_are_named(tmp_path):
    rng = np.random.default_rng(0)
    for split, classes in (("train", "abc"), ("test", "abd")):
        for c in classes:
            write_image(tmp_path / "r" / split / c / "1.png", rng)
    with pytest.raises(BadInputError, match=r"r: the classes of train/ and test/ differ: train/ has "
                                            r"\['a', 'b', 'c'\], test/ has \['a', 'b', 'd'\]"):
        load(name="folder", root=str(tmp_path / "r"))


def test_unusable_images_are_named(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "r" / "train" / "a" / "1.png", rng)
    write_image(tmp_path / "r" / "train" / "b" / "1.png", rng, size=(6, 7))
    with pytest.raises(BadInputError, match=r"b/1\.png: 6 x 7 after the transform, but .*a/1\.png is 10 x"):
        load(name="folder", root=str(tmp_path / "r"))
    with pytest.raises(BadInputError, match=r"b/1\.png: image of 6 x 7 .*smaller than transform.center_crop"):
        load(name="folder", root=str(tmp_path / "r"), transform={"center_crop": 8})
    fixed = load(name="folder", root=str(tmp_path / "r"), transform={"resize": [4, 4]})[0]
    assert fixed["train"][0].shape == (2, 3, 4, 4)
    (tmp_path / "r" / "train" / "b" / "2.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match=r"b/2\.png: not a readable image"):
        load(name="folder", root=str(tmp_path / "r"), transform={"resize": [4, 4]})


def test_arrays_errors_name_the_file_and_the_problem(tmp_path):
    x = np.zeros((4, 3))
    cases = {
        "float_labels": ({"x_train": x, "y_train": np.array([0.0, 1.0, 0.0, 1.0])},
                         r"labels y_train have dtype float64, not integers"),
        "bool_labels": ({"x_train": x, "y_train": np.array([True, False, True, False])},
                        r"labels y_train have dtype bool, not integers"),
        "short": ({"x_train": x, "y_train": np.array([0, 1, 0])},
                  r"x_train has 4 rows but y_train has 3"),
        "no_y": ({"x_train": x, "labels": np.arange(4)},
                 r"missing array\(s\) \['y_train'\]; it holds \['labels', 'x_train'\]"),
        "half_test": ({"x_train": x, "y_train": np.arange(4), "x_test": x},
                      r"x_test without y_test"),
        "test_shape": ({"x_train": x, "y_train": np.arange(4), "x_test": np.zeros((2, 5)),
                        "y_test": np.arange(2)},
                       r"samples of x_test have shape \(5,\), those of x_train \(3,\)"),
        "negative": ({"x_train": x, "y_train": np.array([0, -1, 0, 1])}, r"labels y_train include -1"),
        "scalars": ({"x_train": np.zeros(4), "y_train": np.arange(4)}, r"x_train has shape \(4,\)"),
        "float_test_labels": ({"x_train": x, "y_train": np.arange(4), "x_test": x, "y_test": np.ones(4)},
                              r"labels y_test have dtype float64, not integers"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(BadInputError, match=rf"{name}\.npz: {message}"):
            load(name="arrays", path=str(tmp_path / f"{name}.npz"))
    with pytest.raises(BadInputError, match=r"gone\.npz: no such file"):
        load(name="arrays", path=str(tmp_path / "gone.npz"))
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 64)
    with pytest.raises(BadInputError, match=r"junk\.npz: not a readable \.npz file"):
        load(name="arrays", path=str(tmp_path / "junk.npz"))
    np.save(tmp_path / "one.npy", x)
    with pytest.raises(BadInputError, match=r"one\.npy: a single array, not an \.npz archive"):
        load(name="arrays", path=str(tmp_path / "one.npy"))
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}] * 4, dtype=object), y_train=np.arange(4))
    with pytest.raises(BadInputError, match=r"obj\.npz: array 'x_train' cannot be read without pickle"):
        load(name="arrays", path=str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "no_x.npz", y_train=np.arange(4))  # the parse-time shape check names it too
    with pytest.raises(BadInputError, match=r"no_x\.npz: missing array 'x_train'"):
        sample_shape(DatasetSpec("arrays", path=str(tmp_path / "no_x.npz")))
    np.savez(tmp_path / "img.npz", x_train=np.zeros((4, 2, 5)), y_train=np.arange(4))
    with pytest.raises(BadInputError, match=r"img\.npz: transform.normalize has 3 values per statistic, "
                                            r"but the samples of shape \(2, 5\) have 2 channel"):
        load(name="arrays", path=str(tmp_path / "img.npz"),
             transform={"normalize": {"mean": [0, 0, 0], "std": [1, 1, 1]}})


@pytest.mark.parametrize("spec,message", [
    ({"name": "folder", "root": "r", "transform": {"resize": 8, "blur": 2}},
     r"folder: transform: unknown key\(s\) \['blur'\]; "
     r"allowed: \['grayscale', 'resize', 'center_crop', 'channels', 'normalize'\]"),
    ({"name": "arrays", "path": "a.npz", "transform": {"resize": 8}},
     r"arrays: transform \['resize'\] does not apply to this dataset"),
    ({"name": "digits", "transform": {"normalize": {"mean": [0], "std": [1]}}},
     r"digits: transform \['normalize'\] does not apply"),
    ({"name": "arrays"}, r"arrays: give path, the \.npz file"),
    ({"name": "digits", "path": "a.npz"}, r"digits: path is the \.npz file of the arrays kind"),
    ({"name": "folder", "root": ""}, r"folder: give root"),
    ({"name": "folder", "root": "r", "transform": {"channels": 4}},
     r"transform.channels = 4: images are decoded as RGB"),
    ({"name": "folder", "root": "r", "transform": {"normalize": {"mean": [0, 0], "std": [1, 1]}}},
     r"transform.normalize has 2 values per statistic for 3 channel"),
    ({"name": "folder", "root": "r", "transform": {"normalize": {"mean": [0], "std": [0]}}},
     r"transform.normalize.std must be positive"),
    ({"name": "folder", "root": "r", "transform": {"resize": [8, 8, 3]}},
     r"transform.resize must be an int or \[h, w\]"),
    ({"name": "folder", "root": "r", "transform": {"center_crop": 0}},
     r"transform.center_crop must be a positive integer"),
    ({"name": "folder", "root": "r", "transform": {"grayscale": "yes"}},
     r"transform.grayscale must be true or false"),
    ({"name": "folder", "root": "r", "max_per_class": 3, "n_per_class": 2},
     r"give max_per_class or n_per_class"),
    ({"name": "digits", "max_per_class": 0}, r"max_per_class must be a positive integer"),
    ({"name": "imagenet"}, r"unknown dataset 'imagenet'; choose one of .*'arrays'.*'folder'"),
])
def test_spec_errors_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**spec)
