"""Types shared by every runtime backend and by the layers above it (defense, serve, attacks).

Kept free of onnxruntime and torch so that anything can import them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """The result of one ``predict`` call on a batch of ``n`` samples.

    ``probs`` (n, classes) float32 softmax of the exit each sample left at; ``labels`` (n,) int64 argmax;
    ``exit_index`` (n,) int64, 0-based, ``num_exits - 1`` is the final exit; ``latency_ns`` (n,) int64,
    for each sample the wall time from the start of the call until its exit decision was made (so in
    a batch, samples that leave early have smaller latencies).
    """

    probs: np.ndarray
    labels: np.ndarray
    exit_index: np.ndarray
    latency_ns: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@runtime_checkable
class Runtime(Protocol):
    """What the defense, the server and the attacks need from an early-exit runtime."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape, without the batch axis."""
        ...

    @property
    def num_classes(self) -> int: ...

    @property
    def num_exits(self) -> int: ...

    def predict(self, x: np.ndarray, *, full_depth: bool = False) -> Prediction:
        """Run a batch ``x`` of shape ``(n, *input_shape)`` float32 through the early-exit chain."""
        ...


class FixedShape:
    """The :class:`Runtime` protocol's shape properties, read from ``_input_shape``, ``_num_classes`` and
    ``_num_exits`` (set by the subclass's constructor)."""

    _input_shape: tuple[int, ...]
    _num_classes: int
    _num_exits: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_exits(self) -> int:
        return self._num_exits


class WrappedShape:
    """The :class:`Runtime` protocol's shape properties of a wrapper (a defense, a test tool), read from the runtime it
    wraps, ``_wrapped`` (set by the subclass's constructor): the wrapper answers for whatever it wraps."""

    _wrapped: Runtime

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._wrapped.input_shape)

    @property
    def num_classes(self) -> int:
        return self._wrapped.num_classes

    @property
    def num_exits(self) -> int:
        return self._wrapped.num_exits


@runtime_checkable
class Backend(Protocol):
    """What the chained runtime needs from an execution backend (see the module docstring)."""

    name: str
    thread_safe: bool
    max_batch: int | None

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]: ...

    def take(self, features: Any, idx: np.ndarray) -> Any: ...

    def full(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
