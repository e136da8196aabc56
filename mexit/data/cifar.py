"""Readers for the "CIFAR-10/100 python version" files as https://www.cs.toronto.edu/~kriz/cifar.html ships them.

The files are pickles, so they are read with an unpickler that only resolves the few globals a CIFAR
batch needs (numpy array reconstruction and ``_codecs.encode``): a tampered or foreign pickle is
refused instead of executing code. All present batches (train and test) are pooled into one dataset,
because the 4-way membership split re-partitions everything anyway.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mexit.data._files import CIFAR_URL, existing_root, find_dir
from mexit.data.dataset import Dataset
from mexit.errors import DataError

log = logging.getLogger(__name__)

# Per-channel statistics of the training images in [0, 1] (pixel-level std).
CIFAR10_NORMALIZATION = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
CIFAR100_NORMALIZATION = ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 (re-pickled files)
    ("numpy._core.numeric", "_frombuffer"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR batch contains; anything else is refused (pickles can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):  # files written by numpy 1.x; numpy 2 moved the module
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def read_pickle(path: Path, expected: str) -> dict[Any, Any]:
    """Unpickle one CIFAR file as a dict; :class:`DataError` naming the file and ``expected`` format otherwise."""
    try:
        with open(path, "rb") as fh:
            obj = _BatchUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any failure of a foreign/corrupt pickle is a bad file, never a crash
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}; expected {expected}; replace it with "
                        f"a fresh copy from {CIFAR_URL}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected {expected}; replace it with a fresh copy "
                        f"from {CIFAR_URL}")
    return obj


def _get(d: dict[Any, Any], key: str) -> Any:
    """``d[b"key"]`` (the original files) or ``d["key"]`` (files re-pickled under Python 3); None if absent."""
    return d.get(key.encode(), d.get(key))


def read_batch(path: Path, label_key: str, num_classes: int, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as uint8 (N, 3, 32, 32) images and int64 labels, validated against ``fmt``."""
    expected = f"a {fmt} pickle: a dict with b'data' (uint8, N x 3072) and b'{label_key}' (N ints)"
    batch = read_pickle(path, expected)
    data, labels = _get(batch, "data"), _get(batch, label_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise DataError(f"{path} has keys {keys}, expected {expected}; replace it with a fresh copy from "
                        f"{CIFAR_URL}")
    data = np.asarray(data)
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        labels = None
    if (data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or labels is None
            or len(labels) != len(data)):
        shape = "?" if labels is None else len(labels)
        raise DataError(f"{path}: data is {data.dtype} {data.shape} with {shape} labels, expected {expected}; "
                        f"replace it with a fresh copy from {CIFAR_URL}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}; this is not a {fmt} file; get one from "
                        f"{CIFAR_URL}")
    return data.reshape(-1, 3, 32, 32), labels


def _label_names(path: Path, key: str, num_classes: int, fmt: str) -> list[str] | None:
    if not path.is_file():
        return None
    names = _get(read_pickle(path, f"a {fmt} metadata pickle with b'{key}'"), key)
    if not isinstance(names, list | tuple) or len(names) != num_classes:
        raise DataError(f"{path}: expected b'{key}' to list {num_classes} class names; replace it with a fresh "
                        f"copy from {CIFAR_URL}")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _pool(name: str, paths: list[Path], label_key: str, num_classes: int, fmt: str,
          normalization: tuple[list[float], list[float]], class_names: list[str] | None) -> Dataset:
    parts = [read_batch(p, label_key, num_classes, fmt) for p in paths]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    log.info("loaded %s: %d images from %s", name, len(y), ", ".join(p.name for p in paths))
    return Dataset(name=name, x=x, y=y, num_classes=num_classes, kind="image", input_shape=(3, 32, 32),
                   normalization=normalization, class_names=class_names)


def load_cifar10(root: Path | None) -> Dataset:
    """CIFAR-10: every present ``data_batch_1..5`` plus ``test_batch`` from ``cifar-10-batches-py`` (or its parent)."""
    root = existing_root(root, "cifar10", CIFAR_URL)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    folder = find_dir(root, ("cifar-10-batches-py",), lambda d: any((d / n).is_file() for n in train_names))
    if folder is None:
        raise DataError(f"no CIFAR-10 batches in {root}: expected data_batch_1..5 (at least one), test_batch and "
                        f"batches.meta there or in {root / 'cifar-10-batches-py'}; download and extract "
                        f"'CIFAR-10 python version' from {CIFAR_URL}")
    paths = [folder / n for n in [*train_names, "test_batch"] if (folder / n).is_file()]
    if not (folder / "test_batch").is_file():
        log.warning("%s has no test_batch; using the training batches only", folder)
    names = _label_names(folder / "batches.meta", "label_names", 10, "CIFAR-10 python version") or CIFAR10_CLASSES
    return _pool("cifar10", paths, "labels", 10, "CIFAR-10 python version", CIFAR10_NORMALIZATION, list(names))


def load_cifar100(root: Path | None) -> Dataset:
    """CIFAR-100 (fine labels): ``train`` and ``test`` from ``cifar-100-python`` (or its parent)."""
    root = existing_root(root, "cifar100", CIFAR_URL)
    folder = find_dir(root, ("cifar-100-python",), lambda d: (d / "train").is_file() or (d / "test").is_file())
    if folder is None:
        raise DataError(f"no CIFAR-100 files in {root}: expected train, test and meta there or in "
                        f"{root / 'cifar-100-python'}; download and extract 'CIFAR-100 python version' from "
                        f"{CIFAR_URL}")
    paths = [folder / n for n in ("train", "test") if (folder / n).is_file()]
    names = _label_names(folder / "meta", "fine_label_names", 100, "CIFAR-100 python version")
    return _pool("cifar100", paths, "fine_labels", 100, "CIFAR-100 python version", CIFAR100_NORMALIZATION, names)
