"""CIFAR-10/100 readers: the real shared CIFAR-10 files and small generated ones, good and bad."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mexit.data import Dataset, load_dataset
from mexit.data.cifar import CIFAR10_NORMALIZATION
from mexit.errors import ConfigError, DataError
from tests.data._factories import SHARED_DATA, make_cifar10, make_cifar100, write_cifar_batch

REAL_CIFAR10 = SHARED_DATA / "cifar-10-batches-py"


@pytest.fixture(scope="module")
def real_cifar10() -> Dataset:
    if not (REAL_CIFAR10 / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 files not found at {REAL_CIFAR10}")
    return load_dataset("cifar10", REAL_CIFAR10)


def test_real_cifar10_pools_train_and_test(real_cifar10: Dataset) -> None:
    ds = real_cifar10
    assert ds.name == "cifar10" and ds.kind == "image"
    assert ds.x.shape == (20000, 3, 32, 32) and ds.x.dtype == np.uint8
    assert ds.y.dtype == np.int64 and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    # data_batch_1 is 1,000 per class; the test batch 1,000 per class: pooled, 2,000 each.
    assert np.bincount(ds.y, minlength=10).tolist() == [2000] * 10
    assert ds.class_names is not None and ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    with open(REAL_CIFAR10 / "test_batch", "rb") as fh:
        test = pickle.load(fh, encoding="bytes")
    np.testing.assert_array_equal(ds.x[10000:].reshape(10000, 3072), test[b"data"])
    np.testing.assert_array_equal(ds.y[10000:], test[b"labels"])


def test_real_cifar10_normalization_matches_pixel_statistics(real_cifar10: Dataset) -> None:
    x = real_cifar10.inputs(np.arange(0, 20000, 4))
    per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)
    mean, std = CIFAR10_NORMALIZATION
    assert real_cifar10.normalization == CIFAR10_NORMALIZATION
    np.testing.assert_allclose(per_channel.mean(axis=1), mean, atol=0.01)
    np.testing.assert_allclose(per_channel.std(axis=1), std, atol=0.01)


def test_real_cifar10_parent_dir_form(real_cifar10: Dataset) -> None:
    ds = load_dataset("cifar10", SHARED_DATA)
    assert len(ds) == len(real_cifar10)
    np.testing.assert_array_equal(ds.y, real_cifar10.y)


def test_generated_cifar10_pools_all_batches_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    labels = {"data_batch_1": np.arange(10) % 10, "data_batch_3": np.arange(6) % 3, "test_batch": np.full(4, 9)}
    images = make_cifar10(folder, labels)
    for root in (folder, tmp_path):  # the batches folder itself, and its parent
        ds = load_dataset("cifar10", root)
        assert len(ds) == 20
        np.testing.assert_array_equal(ds.y, np.concatenate(list(labels.values())))
        np.testing.assert_array_equal(ds.x, np.concatenate(list(images.values())))
        assert ds.class_names == [f"class{i}" for i in range(10)]


def test_cifar10_without_meta_uses_standard_names(tmp_path: Path) -> None:
    make_cifar10(tmp_path, {"data_batch_2": np.arange(5)}, meta=False)
    ds = load_dataset("cifar10", tmp_path)
    assert len(ds) == 5 and ds.class_names is not None and ds.class_names[1] == "automobile"


def test_cifar100_fine_labels_and_names(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train, test = np.array([0, 5, 99, 42, 7]), np.array([99, 1, 3])
    images = make_cifar100(folder, train, test)
    for root in (folder, tmp_path):
        ds = load_dataset("cifar100", root)
        assert ds.num_classes == 100 and ds.x.shape == (8, 3, 32, 32)
        np.testing.assert_array_equal(ds.y, np.concatenate([train, test]))
        np.testing.assert_array_equal(ds.x, np.concatenate([images["train"], images["test"]]))
        assert ds.class_names is not None and ds.class_names[99] == "fine99"
        assert ds.normalization is not None and len(ds.normalization[0]) == 3


def test_missing_root_is_config_error() -> None:
    with pytest.raises(ConfigError, match="--data-root is required for cifar10"):
        load_dataset("cifar10", None)


def test_nonexistent_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nope")


@pytest.mark.parametrize(("name", "expected"), [("cifar10", "data_batch_1..5"), ("cifar100", "train, test and meta")])
def test_empty_dir_names_files_and_source(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, tmp_path)
    msg = str(err.value)
    assert expected in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "\n" not in msg


def test_truncated_pickle_names_file(tmp_path: Path) -> None:
    write_cifar_batch(tmp_path / "data_batch_1", np.arange(10))
    path = tmp_path / "data_batch_1"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_1") as err:
        load_dataset("cifar10", tmp_path)
    assert "CIFAR-10 python version" in str(err.value)


def test_not_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", tmp_path)


def test_wrong_keys_names_file_and_keys(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"pixels": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataError, match=r"data_batch_1 has keys \['pixels'\]"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_file_in_cifar10_reader_reports_missing_labels(tmp_path: Path) -> None:
    write_cifar_batch(tmp_path / "data_batch_1", np.arange(3), label_key=b"fine_labels")
    with pytest.raises(DataError, match="b'labels'"):
        load_dataset("cifar10", tmp_path)


def test_wrong_shape(tmp_path: Path) -> None:
    batch = {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_1: data is uint8 \(4, 1024\)"):
        load_dataset("cifar10", tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_cifar_batch(tmp_path / "data_batch_1", np.array([0, 10]))
    with pytest.raises(DataError, match=r"labels outside 0\.\.9"):
        load_dataset("cifar10", tmp_path)


def test_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (eval, ("1 + 1",))  # not print: Ray (imported by other tests) replaces builtins.print

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match=r"refusing to load global builtins\.eval"):
        load_dataset("cifar10", tmp_path)


def test_python3_string_keys_accepted(tmp_path: Path) -> None:
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": data, "labels": [3, 4]}, protocol=5))
    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.x.reshape(2, -1), data)
    assert ds.y.tolist() == [3, 4]


def test_numpy1_era_pickle_accepted(tmp_path: Path) -> None:
    # The original CIFAR files name numpy.core.multiarray (numpy 1.x); numpy 2 moved it to numpy._core.
    data = np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [1, 2, 3]}, protocol=2)
    assert b"numpy._core.multiarray\n" in raw
    (tmp_path / "data_batch_1").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.x.reshape(3, -1), data)
