"""The in-memory dataset every later stage consumes, and the registry entry that describes how to load one.

Images are kept as ``uint8`` (N, C, H, W) rather than float32 so that CIFAR/TinyImageNet fit in memory
four times over; :meth:`Dataset.inputs` produces the float32 model inputs in [0, 1] on demand, per batch.
Normalisation is *not* applied here: it is recorded on the dataset and becomes the first operation of the
model's stage 0 (see ``mexit.train.multiexit.Normalize``), so an exported model takes exactly what this
layer produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

Kind = Literal["image", "tabular"]


@dataclass
class Dataset:
    """A labelled dataset held in memory: every sample of every split (the split is a separate index set)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    kind: Kind
    input_shape: tuple[int, ...]
    normalization: tuple[list[float], list[float]] | None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        # These are programming errors of a reader, not user errors: fail loudly with ValueError.
        self.y = np.asarray(self.y, dtype=np.int64)
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"{self.name}: x has {len(self.x)} samples but y has shape {self.y.shape}")
        if tuple(self.x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name}: x has sample shape {self.x.shape[1:]}, expected {self.input_shape}")
        if self.kind == "image" and self.x.dtype != np.uint8:
            raise ValueError(f"{self.name}: image data must be uint8, got {self.x.dtype}")
        if self.kind == "tabular" and self.x.dtype != np.float32:
            raise ValueError(f"{self.name}: tabular data must be float32, got {self.x.dtype}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Float32 model inputs for the samples ``idx`` (all when None): images scaled to [0, 1], tabular as is.

        Call it per batch on large image sets: all of CIFAR-10 as float32 is 700 MB. For tabular data
        with ``idx=None`` the stored array itself is returned (no copy), so do not modify it in place.
        """
        x = self.x if idx is None else self.x[np.asarray(idx)]
        if self.kind == "image":
            return x.astype(np.float32) / np.float32(255.0)
        return np.asarray(x, dtype=np.float32)

    def subset(self, idx: np.ndarray) -> Dataset:
        """A new dataset holding the samples ``idx`` (same metadata); e.g. one part of a :class:`Splits`."""
        idx = np.asarray(idx)
        return replace(self, x=self.x[idx], y=self.y[idx])


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about a dataset before loading it: shape, classes, files and where to get them."""

    name: str
    kind: Kind
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    files: str
    source: str
    loader: Callable[[Path | None], Dataset]
    needs_root: bool = True
