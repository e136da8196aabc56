"""Test doubles for the defense tests: a tiny numpy "early-exit runtime" with known per-exit times."""

from __future__ import annotations

import time

import numpy as np

from mexit.runtime.types import Prediction

EXIT_TIMES_S = (0.002, 0.004, 0.006)


def exits_of(x: np.ndarray, num_exits: int = len(EXIT_TIMES_S)) -> np.ndarray:
    """Deterministic exit per input: the first feature (in [0, 1)) split into equal bins."""
    return np.clip((np.asarray(x)[:, 0] * num_exits).astype(np.int64), 0, num_exits - 1)


class FakeRuntime:
    """Sleeps the per-exit time of the deepest sample in the batch; supports ``force_exit``."""

    input_shape = (4,)
    num_classes = 3

    def __init__(self, exit_times_s: tuple[float, ...] = EXIT_TIMES_S) -> None:
        self.exit_times_s = exit_times_s
        self.calls = 0

    @property
    def num_exits(self) -> int:
        return len(self.exit_times_s)

    def _run(self, x: np.ndarray, exits: np.ndarray) -> Prediction:
        start = time.perf_counter_ns()
        self.calls += 1
        time.sleep(self.exit_times_s[int(exits.max())] if len(exits) else 0.0)
        n = len(exits)
        labels = (exits + 1) % self.num_classes
        probs = np.eye(self.num_classes, dtype=np.float32)[labels]
        lat = np.full(n, time.perf_counter_ns() - start, dtype=np.int64)
        return Prediction(probs=probs, labels=labels.astype(np.int64), exit_index=exits, latency_ns=lat)

    def predict(self, x: np.ndarray, *, full_depth: bool = False, force_exit: int | None = None) -> Prediction:
        x = np.asarray(x, dtype=np.float32)
        if full_depth:
            exits = np.full(len(x), self.num_exits - 1, dtype=np.int64)
        elif force_exit is not None:
            exits = np.full(len(x), int(force_exit), dtype=np.int64)
        else:
            exits = exits_of(x, self.num_exits)
        return self._run(x, exits)


class PlainFakeRuntime(FakeRuntime):
    """The same runtime without ``force_exit``: only the Runtime protocol's signature."""

    def predict(self, x: np.ndarray, *, full_depth: bool = False) -> Prediction:  # type: ignore[override]
        return super().predict(x, full_depth=full_depth)


def inputs_for_exits(exits: list[int] | np.ndarray, seed: int = 0, num_exits: int = len(EXIT_TIMES_S)) -> np.ndarray:
    """Distinct float32 inputs (n, 4) that the fake runtimes send to the given exits."""
    rng = np.random.default_rng(seed)
    exits = np.asarray(exits)
    x = rng.random((len(exits), 4)).astype(np.float32)
    x[:, 0] = ((exits + rng.uniform(0.1, 0.9, len(exits))) / num_exits).astype(np.float32)
    assert np.array_equal(exits_of(x, num_exits), exits)
    return x
