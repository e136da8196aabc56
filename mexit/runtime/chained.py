"""``EarlyExitRuntime``: run a bundle's stages in a chain and let every sample leave at its own exit.

After stage ``k`` the runtime takes the softmax of exit ``k``'s logits for the samples still in flight,
applies the exit policy row by row (see :mod:`mexit.runtime.policy`), records the samples that leave,
and carries on with the rest only: their features are compacted (``backend.take``) and fed to stage
``k + 1``. A batch is therefore never decided from its first sample (a bug of the reference code),
and a sample's result does not depend on which other samples share its batch.

Backends may take over part of this work for speed (same decisions, probabilities within ~1e-7):
:class:`~mexit.runtime.backends.OrtCpuBackend` computes softmax and its maximum inside the stage
graphs (``run_stage_scored``), and runs a batch-1 request through one graph holding the whole early
exit (``predict_one``, nested ``If`` nodes), so no Python runs between stages.

Latency: ``latency_ns[i]`` is the wall time (``time.perf_counter_ns``) from the start of the ``predict``
call (input validation included) to the moment sample ``i``'s exit decision was made. Within one
batch it is therefore non-decreasing in the exit index. (With ``OrtCpuBackend(batch_graph=True)`` a batch runs
as one graph and every sample's latency is the end of the call.)

Inputs: see :mod:`mexit.runtime.inputs` (:class:`mexit.errors.InputError` naming expected vs given). They are
validated before any backend call, except that a batch-1 request on a single-graph backend has its finiteness
checked inside that graph (the same error, and no result): numpy calls between requests slow the next ``run``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from mexit.bundle import Bundle, Manifest, load_bundle
from mexit.errors import ConfigError, InputError
from mexit.runtime.inputs import validate_inputs
from mexit.runtime.policy import ExitPolicy, shifted_exp, softmax
from mexit.runtime.registry import get_backend
from mexit.runtime.types import Backend, FixedShape, Prediction

#: The native float32 dtype object (a singleton): ``x.dtype is _FLOAT32`` is the request fast path's dtype test.
_FLOAT32 = np.dtype(np.float32)


class EarlyExitRuntime(FixedShape):
    """A loaded bundle on one backend, with an exit policy; implements :class:`mexit.runtime.types.Runtime`.

    ``policy`` and ``threshold`` default to the bundle's manifest; passing them overrides it for this
    runtime only (e.g. to sweep thresholds, or re-calibrate for an FP16 or TF32 backend).

    ``backend`` is a registered name (:func:`mexit.runtime.backend_names`) or a ready backend object.
    ``threads``, ``device`` and ``fp16`` mean the same on every backend (see
    :mod:`mexit.runtime.registry`; ``None`` leaves the backend's default); ``backend_opts`` are the
    backend's own options (e.g. ``int8_heads=True``, ``provider="tensorrt"``, ``cuda_graphs=True``).
    Unknown names or options are a :class:`~mexit.errors.ConfigError`. ``intra_op_threads=`` is a
    deprecated alias of ``threads``.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        backend: str | Backend = "onnxruntime",
        policy: str | None = None,
        threshold: float | None = None,
        threads: int | None = None,
        device: int | str | None = None,
        fp16: bool | None = None,
        **backend_opts: Any,
    ) -> None:
        self.bundle = load_bundle(bundle)
        m = self.bundle.manifest
        self.policy = ExitPolicy(policy or m.policy.kind, m.policy.threshold if threshold is None else threshold)
        common = {"threads": threads, "device": device, "fp16": fp16}
        opts = {**{k: v for k, v in common.items() if v is not None}, **backend_opts}
        if isinstance(backend, str):
            self.backend: Backend = get_backend(backend, self.bundle, **opts)
        else:
            if opts:
                raise ConfigError(f"backend options {sorted(opts)} given with a ready backend object; "
                                  "configure the backend itself, or pass its name")
            self.backend = backend
        self._input_shape = tuple(m.input.sample_shape)
        self._kind = m.dataset.kind
        self._num_exits = m.model.num_exits
        self._num_classes = m.model.num_classes
        self._lock: AbstractContextManager[Any] = nullcontext() if self.backend.thread_safe else threading.Lock()
        # Backends that compute softmax and its maximum inside the stage graphs (OrtCpuBackend with
        # fold_decision): the max-probability decision is then one comparison per stage.
        self._scored = self.policy.kind == "max_prob" and bool(getattr(self.backend, "folds_decision", False))
        # Backends that run a whole batch-1 early exit as one graph (OrtCpuBackend.predict_one), fed one
        # threshold per internal exit: the policy's, or +-inf to force an exit along the same path.
        self._one = (getattr(self.backend, "predict_one", None)
                     if self.policy.kind == "max_prob" and getattr(self.backend, "has_single_graph", False) else None)
        self._one_checks_finite = self._one is not None and bool(getattr(self.backend, "checks_finite_one", False))
        self._tau_feeds: dict[int | None, dict[str, np.ndarray]] = {}
        # Backends that run a whole batch's per-sample early exit as one graph (OrtCpuBackend(batch_graph=True)).
        self._many = (getattr(self.backend, "predict_batch", None)
                      if self.policy.kind == "max_prob" and getattr(self.backend, "has_batch_graph", False) else None)
        # The request fast path (see predict): a ready float32 (1, *input_shape) array on a thread-safe single graph
        # that checks finiteness itself needs nothing but the run and its result.
        self._one_shape = (1, *self._input_shape)
        self._fast_one: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        if self._one is not None and self._one_checks_finite and self.backend.thread_safe:
            feed = self._taus(None)
            self._fast_one = lambda x: self._one(x, feed)  # type: ignore[misc]  # _one looked up per call

    # --- Runtime protocol -------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.policy.threshold)

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def exit_costs(self) -> list[int]:
        """FLOPs spent to leave at each exit (earlier heads included), from the manifest."""
        return [e.runtime_flops for e in self.bundle.manifest.exits]

    def predict(self, x: np.ndarray, *, full_depth: bool = False, force_exit: int | None = None) -> Prediction:
        """Classify the batch ``x``; see the module docstring for inputs, exits and latency.

        ``full_depth=True`` runs the single full-depth graph (the vanilla model: every sample at the
        final exit). ``force_exit=k`` sends every sample out at exit ``k`` along the normal path (the
        earlier exits are still evaluated, so the timing is that of a natural exit at ``k``).
        """
        t0 = time.perf_counter_ns()
        fast = self._fast_one
        if (fast is not None and force_exit is None and not full_depth and type(x) is np.ndarray
                and x.shape == self._one_shape and x.dtype is _FLOAT32 and x.flags.c_contiguous):
            # A request as a server or a client sends it: skip the general path's branches and calls, which cost
            # several times their own time after a model run has evicted the interpreter's working set. Same checks,
            # same result, same latency definition. 6-7 µs less a request, paired on the same request and runtime
            # (ResNet-56 ×6 and FCN-18-1 ×6, benchmarks/request_path_paired.py --compare fast_path).
            p, exits, labels = fast(x)
            return Prediction(probs=p, labels=labels, exit_index=exits,
                              latency_ns=np.array([time.perf_counter_ns() - t0], dtype=np.int64))
        if force_exit is not None:
            if isinstance(force_exit, bool) or not isinstance(force_exit, int | np.integer) or not (
                0 <= force_exit < self._num_exits
            ):
                raise InputError(f"force_exit must be an exit index in 0..{self._num_exits - 1}, got {force_exit!r}")
            if full_depth:
                raise InputError("full_depth and force_exit are exclusive: pass one of them")
            force_exit = int(force_exit)
        one = self._one_checks_finite and not full_depth and getattr(x, "shape", (0,))[:1] == (1,)
        xs = validate_inputs(x, self._input_shape, self._kind, finite=not one)  # else the graph checks it
        n = xs.shape[0]
        graph = self._one if n == 1 else self._many
        if graph is not None and not full_depth and (n == 1 or self.backend.max_batch is None):
            # The whole early exit as one graph run (a request, or a batch with backend_opt batch_graph), labels
            # included: the outputs are fresh arrays, so nothing is allocated or copied around them, and no numpy
            # call runs on a request's latency path. A batch's samples all get the call's end as their latency.
            with self._lock:
                p, exits, labels = graph(xs, self._taus(force_exit))
            now = time.perf_counter_ns()
            latency = np.array([now - t0], dtype=np.int64) if n == 1 else np.full(n, now - t0, dtype=np.int64)
            return Prediction(probs=p, labels=labels, exit_index=exits, latency_ns=latency)
        probs = np.empty((n, self._num_classes), dtype=np.float32)
        exit_index = np.empty(n, dtype=np.int64)
        latency = np.empty(n, dtype=np.int64)
        step = self.backend.max_batch or n
        with self._lock:
            for start in range(0, n, step):
                stop = min(n, start + step)
                if full_depth:
                    self._full(xs[start:stop], start, t0, probs, exit_index, latency)
                else:
                    self._chain(xs[start:stop], start, t0, force_exit, probs, exit_index, latency)
        return Prediction(probs=probs, labels=probs.argmax(axis=1).astype(np.int64), exit_index=exit_index,
                          latency_ns=latency)

    def _full(self, x: np.ndarray, offset: int, t0: int, probs: np.ndarray, exit_index: np.ndarray,
              latency: np.ndarray) -> None:
        p = softmax(self.backend.full(x))
        now = time.perf_counter_ns()
        sl = slice(offset, offset + len(x))
        probs[sl] = p
        exit_index[sl] = self._num_exits - 1
        latency[sl] = now - t0

    def _taus(self, force_exit: int | None) -> dict[str, np.ndarray]:
        """Per-exit threshold inputs of the single graph: the policy threshold, or force ``force_exit``. Nothing
        at all when the graph's own default (``backend.tau_default``) is the policy threshold: the inputs keep it."""
        feed = self._tau_feeds.get(force_exit)
        if feed is None:
            default = getattr(self.backend, "tau_default", None)
            values = [self.policy.threshold] * (self._num_exits - 1)
            if force_exit is not None:  # conf >= +inf never holds, conf >= -inf always does
                values = [np.inf if j != force_exit else -np.inf for j in range(self._num_exits - 1)]
            elif default is not None and np.float32(self.policy.threshold) == np.float32(default):
                values = []  # the graph's own default: feed nothing
            feed = {f"mexit_tau{j}": np.array(v, dtype=np.float32) for j, v in enumerate(values)}
            self._tau_feeds[force_exit] = feed
        return feed

    def _chain(self, x: np.ndarray, offset: int, t0: int, force_exit: int | None, probs: np.ndarray,
               exit_index: np.ndarray, latency: np.ndarray) -> None:
        """The per-stage chain over one batch, results written at rows ``offset:offset + len(x)``.

        Between two stage runs only the decision and the compaction happen; which rows left where, with which
        probabilities, is written out after the last stage. Every Python or numpy operation between two runs
        costs several times its own time, because the run before it evicted the interpreter's and numpy's
        working set from the core's caches (FCN-18-1 ×6 at batch 64: ~450 µs a batch between the runs against
        ~90 µs for the same operations replayed warm); grouped after the chain they run warm.
        """
        last = self._num_exits - 1
        threshold = self.policy.threshold
        scored = self._scored
        in_flight = len(x)
        rows: np.ndarray | None = None  # the batch rows still in flight, once some have left (None: all)
        # (exit, rows in flight, leaving mask or None for all of them, probabilities, decision time). The stage
        # outputs kept here are fresh arrays (ORT's run returns new ones), so later runs do not overwrite them.
        left: list[tuple[int, np.ndarray | None, np.ndarray | None, Any, int]] = []
        h: Any = x
        for k in range(self._num_exits):
            if k == last:
                _, logits = self.backend.run_stage(k, h)
                left.append((k, rows, None, softmax(logits), time.perf_counter_ns()))
                break
            if scored:  # softmax and max probability come out of the stage graph
                features, p, conf = self.backend.run_stage_scored(k, h)  # type: ignore[attr-defined]
                done = conf >= threshold
            else:  # decide from the row sums of exp(z - max) (policy.shifted_exp); divide after the chain
                features, logits = self.backend.run_stage(k, h)
                e, s = shifted_exp(logits)
                done = self.policy.exits_shifted(e, s)
                p = (e, s)
            if force_exit is not None:  # the rule ran anyway, so the timing matches a natural exit
                done[:] = k == force_exit
            now = time.perf_counter_ns()
            leaving = int(np.count_nonzero(done))
            if leaving == in_flight:
                left.append((k, rows, None, p, now))
                break
            if leaving:
                left.append((k, rows, done, p, now))
                keep = np.flatnonzero(~done)
                h = self.backend.take(features, keep)
                rows = keep if rows is None else rows[keep]
                in_flight -= leaving
            else:
                h = features
        for k, at, done, p, now in left:
            p = p[0] / p[1] if isinstance(p, tuple) else p  # (exp(z - max), its row sums) on the numpy path
            out: slice | np.ndarray
            if done is None:
                out = slice(offset, offset + len(x)) if at is None else at + offset
            else:
                out = (np.flatnonzero(done) if at is None else at[done]) + offset
                p = p[done]
            probs[out] = p
            exit_index[out] = k
            latency[out] = now - t0

    def warmup(self, n: int = 10, *, batch_sizes: tuple[int, ...] | list[int] | range = (1,)) -> None:
        """Run every path (each exit, and the full graph) ``n`` times per batch size so that first-call costs
        (allocations, kernel selection, lazy initialisation) do not land in measured latencies.

        On GPU backends each new batch shape can pay a one-off cost (cuDNN algorithm search, allocator
        growth); compaction produces every survivor count up to the batch size, so a server taking
        batches up to B should warm ``batch_sizes=range(1, B + 1)``.
        """
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ConfigError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
        for _ in range(max(0, int(n))):
            for b in sizes:
                dummy = np.zeros((b, *self._input_shape), dtype=np.float32)
                for k in range(self._num_exits):
                    self.predict(dummy, force_exit=k)
                self.predict(dummy, full_depth=True)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> EarlyExitRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EarlyExitRuntime({self.bundle.manifest.model.arch}, {self._num_exits} exits, "
            f"backend={self.backend.name}, policy={self.policy.kind}@{self.policy.threshold:g})"
        )
