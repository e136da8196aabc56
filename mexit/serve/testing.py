"""A tiny, deterministic numpy stand-in for an early-exit runtime.

Serving, clients and benchmarks need a model to put behind the protocol without training or
exporting one; this is it. It implements :class:`mexit.runtime.types.Runtime` with the same
validation and per-sample early-exit semantics as the real chained runtime, so everything above the
runtime (server, clients, attacks' plumbing) can be tested against it, in-process or in a server
subprocess (``mexit serve --factory mexit.serve.testing:ToyRuntime``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mexit.errors import ConfigError, InputError
from mexit.runtime.types import FixedShape, Prediction, Runtime, WrappedShape


class ToyRuntime(FixedShape):
    """``num_exits`` fixed random linear classifiers over the flattened input, chosen by confidence.

    Exit ``k`` computes ``softmax(x @ W_k * scale_k)``; a sample leaves at the first exit whose top
    probability reaches ``threshold`` (the last exit otherwise). Later exits get larger scales, so
    they are more confident, as in a trained multi-exit net. Everything is a function of ``seed``, so
    two instances (e.g. in-process and in a server subprocess) give identical outputs.

    ``exit_delay_s`` adds a simulated compute time per exit reached (slept once per batch, for the
    deepest exit in it), giving exit-dependent response times for timing-channel experiments.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (16,),
        num_classes: int = 4,
        num_exits: int = 3,
        threshold: float = 0.7,
        seed: int = 0,
        exit_delay_s: float = 0.0,
    ) -> None:
        self._input_shape = tuple(int(d) for d in input_shape)
        if not self._input_shape or any(d < 1 for d in self._input_shape) or num_classes < 2 or num_exits < 1:
            raise ConfigError(f"ToyRuntime needs positive input dims, >= 2 classes and >= 1 exit, got "
                              f"{self._input_shape}, {num_classes}, {num_exits}")
        self._num_classes = int(num_classes)
        self._num_exits = int(num_exits)
        self.threshold = float(threshold)
        self.exit_delay_s = float(exit_delay_s)
        rng = np.random.default_rng(seed)
        features = int(np.prod(self._input_shape))
        scales = np.linspace(1.5, 4.0, self._num_exits, dtype=np.float32)  # ~1/4, 2/4, 1/4 exits on N(0, 1) data
        self._weights = [
            (rng.standard_normal((features, self._num_classes)) / np.sqrt(features)).astype(np.float32) * s
            for s in scales
        ]

    def predict(self, x: np.ndarray, *, full_depth: bool = False, force_exit: int | None = None) -> Prediction:
        """Per-sample early exit over the batch ``x`` (n, *input_shape) float32."""
        start = time.perf_counter_ns()
        x = self._check(x)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        probs_per_exit = [_softmax(flat @ w) for w in self._weights]
        last = self._num_exits - 1
        if force_exit is not None:
            if not 0 <= force_exit <= last:
                raise InputError(f"force_exit must be in [0, {last}], got {force_exit}")
            exits = np.full(n, force_exit, dtype=np.int64)
        elif full_depth:
            exits = np.full(n, last, dtype=np.int64)
        else:
            confident = np.stack([p.max(axis=1) >= self.threshold for p in probs_per_exit[:-1]] +
                                 [np.ones(n, dtype=bool)], axis=1)
            exits = confident.argmax(axis=1).astype(np.int64)
        probs = np.stack(probs_per_exit, axis=0)[exits, np.arange(n)]
        if self.exit_delay_s > 0 and n:
            time.sleep(self.exit_delay_s * (int(exits.max()) + 1))
        elapsed = time.perf_counter_ns() - start
        # Simulated per-sample decision times: proportional to the exit reached.
        latency = (elapsed * (exits + 1) // self._num_exits).astype(np.int64)
        return Prediction(
            probs=probs.astype(np.float32),
            labels=probs.argmax(axis=1).astype(np.int64),
            exit_index=exits,
            latency_ns=latency,
        )

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != len(self._input_shape) + 1 or x.shape[1:] != self._input_shape:
            raise InputError(f"input must have shape (n, {', '.join(map(str, self._input_shape))}), got {x.shape}")
        if x.dtype != np.float32:
            raise InputError(f"input must be float32, got {x.dtype}")
        if not np.isfinite(x).all():
            raise InputError("input must be finite (no NaN or infinity)")
        return x


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ThreadHopRuntime(WrappedShape):
    """Delegates to ``runtime`` but hands every ``predict`` to Starlette's thread pool via ``predict_async``.

    The server's ``predict="thread"`` path (the same ``run_in_threadpool`` call), reachable through a
    ``--factory`` when the serving command offers no option to force it: the serving benchmarks use it
    to measure what running small models inline saves.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = self._wrapped = runtime
        self.model_name = getattr(runtime, "model_name", None)

    def predict(self, x: np.ndarray, *, full_depth: bool = False) -> Prediction:
        return self.runtime.predict(x, full_depth=full_depth)

    async def predict_async(self, x: np.ndarray) -> Prediction:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self.runtime.predict, x)


def thread_hop(bundle: str | None = None, *, backend: str = "onnxruntime", threads: int = 1,
               toy: dict[str, Any] | None = None) -> Any:
    """A ``--factory`` for :class:`ThreadHopRuntime` around a bundle's runtime, or around ``ToyRuntime(**toy)``."""
    if bundle is None:
        return ThreadHopRuntime(ToyRuntime(**(toy or {})))
    from dataclasses import replace

    from mexit.serve.factory import build_served_runtime

    served = build_served_runtime(bundle, backend=backend, threads=threads)
    return replace(served, runtime=ThreadHopRuntime(served.runtime))
