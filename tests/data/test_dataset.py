"""Dataset object, registry and the embedded digits dataset."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mexit.data import DATASETS, Dataset, dataset_names, get_spec, load_dataset
from mexit.errors import ConfigError


def _images(n: int = 6) -> Dataset:
    x = np.arange(n * 3 * 2 * 2, dtype=np.int64).astype(np.uint8).reshape(n, 3, 2, 2)
    x[0] = 255
    return Dataset(name="toy", x=x, y=np.arange(n) % 3, num_classes=3, kind="image", input_shape=(3, 2, 2),
                   normalization=([0.5] * 3, [0.25] * 3), class_names=["a", "b", "c"])


def test_image_inputs_are_float_in_unit_range() -> None:
    ds = _images()
    x = ds.inputs()
    assert x.dtype == np.float32 and x.shape == (6, 3, 2, 2)
    assert x.min() >= 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x * 255, ds.x)
    part = ds.inputs(np.array([4, 1]))
    assert part.shape == (2, 3, 2, 2)
    np.testing.assert_allclose(part[0] * 255, ds.x[4])


def test_tabular_inputs_pass_through() -> None:
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    ds = Dataset(name="t", x=x, y=[0, 1, 0, 1, 1], num_classes=2, kind="tabular", input_shape=(4,),
                 normalization=None)
    assert ds.y.dtype == np.int64
    assert ds.inputs().dtype == np.float32
    np.testing.assert_array_equal(ds.inputs(np.array([3])), x[[3]])


def test_subset_keeps_metadata() -> None:
    ds = _images()
    sub = ds.subset(np.array([5, 0, 2]))
    assert len(sub) == 3 and sub.y.tolist() == [2, 0, 2]
    np.testing.assert_array_equal(sub.x, ds.x[[5, 0, 2]])
    assert (sub.name, sub.num_classes, sub.kind, sub.input_shape) == ("toy", 3, "image", (3, 2, 2))
    assert sub.normalization == ds.normalization and sub.class_names == ds.class_names
    assert len(ds) == 6  # the original is untouched


def test_inconsistent_dataset_is_rejected() -> None:
    x = np.zeros((3, 3, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="samples"):
        Dataset(name="bad", x=x, y=[0, 1], num_classes=2, kind="image", input_shape=(3, 2, 2), normalization=None)
    with pytest.raises(ValueError, match="labels must lie"):
        Dataset(name="bad", x=x, y=[0, 1, 2], num_classes=2, kind="image", input_shape=(3, 2, 2),
                normalization=None)
    with pytest.raises(ValueError, match="uint8"):
        Dataset(name="bad", x=x.astype(np.float32), y=[0, 1, 1], num_classes=2, kind="image",
                input_shape=(3, 2, 2), normalization=None)


def test_registry_lists_all_datasets() -> None:
    assert dataset_names() == ["cifar10", "cifar100", "tinyimagenet", "purchase", "texas", "location", "digits"]
    expected = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "tinyimagenet": ((3, 64, 64), 200),
                "purchase": ((600,), 100), "texas": ((6169,), 100), "location": ((446,), 30), "digits": ((64,), 10)}
    for name, (shape, classes) in expected.items():
        spec = DATASETS[name]
        assert (spec.input_shape, spec.num_classes) == (shape, classes)
        assert spec.needs_root == (name != "digits")
        assert spec.files and spec.source and spec.description


def test_get_spec_is_forgiving_about_spelling() -> None:
    assert get_spec("CIFAR-10").name == "cifar10"
    assert get_spec("tiny_imagenet").name == "tinyimagenet"


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'; choose one of: cifar10, cifar100, .*digits"):
        load_dataset("mnist")


def test_digits_needs_no_files() -> None:
    ds = load_dataset("digits")
    assert ds.kind == "tabular" and ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y.dtype == np.int64 and np.bincount(ds.y).min() > 150 and ds.num_classes == 10
    assert ds.input_shape == (64,) and ds.normalization is None
    assert len(load_dataset("digits", "/ignored/path")) == 1797


def test_importing_data_pulls_in_neither_torch_nor_sklearn_nor_pil() -> None:
    code = ("import sys, mexit.data; bad = [m for m in ('torch', 'sklearn', 'PIL') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
