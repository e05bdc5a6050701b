"""Dataset stage: offline datasets, options, and torchvision loaders on tiny files written here in
each dataset's real on-disk format."""

import numpy as np
import pytest
from datasets_ondisk import tiny_cifar, tiny_mnist, tiny_svhn

from dnc.data import DatasetSpec, load_splits, prepare_dataset, read_split


@pytest.fixture
def no_md5(monkeypatch):
    """CIFAR and SVHN check md5 sums of the real archives; tiny files cannot match them."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    for cls in (tvd.CIFAR10, tvd.CIFAR100, tvd.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    for module in (cifar, svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, name, folder):
    data = tiny_mnist(tmp_path, folder)
    splits, index = load_splits(DatasetSpec(name, root=str(tmp_path)))
    X, y = splits["train"]
    assert X.shape == (12, 1, 28, 28) and X.dtype == np.float32
    np.testing.assert_allclose(X[:, 0] * 255, data["train"][0], atol=1e-4)
    np.testing.assert_array_equal(y, data["train"][1])
    assert splits["test"][0].shape == (6, 1, 28, 28)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles(tmp_path, no_md5, hundred):
    written = tiny_cifar(tmp_path, hundred)
    splits, _ = load_splits(DatasetSpec("cifar100" if hundred else "cifar10", root=str(tmp_path)))
    X, y = splits["train"]
    first = written["train" if hundred else "data_batch_1"]
    assert X.shape == ((6 if hundred else 30), 3, 32, 32)
    # torchvision reshapes rows to (3, 32, 32) then to HWC; we go back to CHW.
    np.testing.assert_allclose(X[:6] * 255, first[0].reshape(6, 3, 32, 32), atol=1e-4)
    np.testing.assert_array_equal(y[:6], first[1])


def test_svhn_mat_files(tmp_path, no_md5):
    tiny_svhn(tmp_path, n_train=8, n_test=4)  # labels 1..10 cycling: SVHN stores digit 0 as 10
    splits, _ = load_splits(DatasetSpec("svhn", root=str(tmp_path)))
    X, y = splits["train"]
    assert X.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(y, (np.arange(1, 9) % 10 + 1) % 10)


def test_missing_files_name_the_root_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root .*nowhere.*cifar-10-batches-py.*download"):
        load_splits(DatasetSpec("cifar10", root=str(tmp_path / "nowhere")))


def test_offline_datasets_balanced_subsets_and_standardisation(tmp_path):
    for name in ("digits", "mnist1d", "gaussian"):
        splits, index = load_splits(DatasetSpec(name, n_per_class=7, standardize=True))
        X, y = splits["train"]
        assert np.bincount(y).tolist() == [7] * 10
        flat = X.reshape(len(y), -1)
        std = flat.std(0)
        assert np.allclose(flat.mean(0)[std > 0], 0, atol=1e-5) and np.allclose(std[std > 0], 1, atol=1e-4)
        assert (index["train"][1:] > index["train"][:-1]).all()  # kept in source order
    first, _ = load_splits(DatasetSpec("digits", first_n=11))
    assert len(first["train"][1]) == 11
    with pytest.raises(ValueError, match="n_per_class or first_n"):
        DatasetSpec("digits", n_per_class=3, first_n=3)


def test_parquet_roundtrip(tmp_path):
    meta = prepare_dataset(DatasetSpec("digits", n_per_class=5), tmp_path / "d.parquet")
    X, y, m = read_split(tmp_path / "d.parquet", "train")
    splits, _ = load_splits(DatasetSpec("digits", n_per_class=5))
    assert tuple(X.shape) == (50, 1, 8, 8) and m["shape"] == [1, 8, 8] == meta["shape"]
    np.testing.assert_array_equal(X.numpy(), splits["train"][0])
    np.testing.assert_array_equal(y.numpy(), splits["train"][1])
    assert m["num_classes"] == 10 and m["counts"]["train"] == 50


def test_class_subset_keeps_exactly_those_source_rows_relabelled(tmp_path):
    data = tiny_mnist(tmp_path, n=24)  # train labels 0..9, 0..9, 0..3; test 0..9, 0, 1
    splits, index = load_splits(DatasetSpec("mnist", root=str(tmp_path), classes=[7, 2]))
    X_src, y_src = data["train"]
    rows = [i for i, label in enumerate(y_src) if label in (7, 2)]  # source order
    assert index["train"].tolist() == rows == [2, 7, 12, 17, 22]
    X, y = splits["train"]
    np.testing.assert_allclose(X[:, 0] * 255, X_src[rows], atol=1e-4)
    assert y.tolist() == [1, 0, 1, 0, 1]  # 7 -> 0, 2 -> 1: the order given
    test_rows = [i for i, label in enumerate(data["t10k"][1]) if label in (7, 2)]
    assert index["test"].tolist() == test_rows and splits["test"][1].tolist() == [1, 0]
    # Per-class subsets count within the kept classes, after the relabelling.
    one, idx = load_splits(DatasetSpec("mnist", root=str(tmp_path), classes=[7, 2], n_per_class=1))
    assert idx["train"].tolist() == [2, 7] and one["train"][1].tolist() == [1, 0]


def test_class_subset_metadata_and_errors(tmp_path):
    meta = prepare_dataset(DatasetSpec("digits", classes=(3, 8), n_per_class=5), tmp_path / "d.parquet")
    X, y, m = read_split(tmp_path / "d.parquet", "train")
    assert m["num_classes"] == meta["num_classes"] == 2 and m["classes"] == [3, 8]
    assert np.bincount(y.numpy()).tolist() == [5, 5] and m["spec"]["classes"] == [3, 8]
    assert prepare_dataset(DatasetSpec("digits", n_per_class=1), tmp_path / "a.parquet")["classes"] is None
    with pytest.raises(ValueError, match=r"dataset 'digits': classes \[12\] do not occur in its train split"):
        load_splits(DatasetSpec("digits", classes=[3, 12]))
    with pytest.raises(ValueError, match="gaussian: classes must name at least two distinct labels"):
        DatasetSpec("gaussian", classes=[1, 1])

