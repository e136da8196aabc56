"""GuardedRuntime: an early-exit runtime whose responses leave only at the delay policy's target time.

It wraps any :class:`mexit.runtime.types.Runtime` and is one itself, so the server (or an attack run
against a local deployment) uses it unchanged. At start-up it calibrates the clean time ``t_exit`` of
every exit (Algorithm 1, line 5): the median wall time of a batch-1 call that leaves at that exit. Per
request it computes the prediction, then holds the response until ``arrival + max_i target_i`` —
``time.sleep`` in :meth:`predict`, ``asyncio.sleep`` in :meth:`predict_async` so that a waiting response
does not hold up other requests. A request whose compute already overran its target returns at once
(the guard only ever adds time). ``latency_ns`` of the returned prediction is the *released* latency,
what a client observes, the same for every sample of the batch since they leave together.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mexit.defense.timeguard import DelayPolicy, check_clean_times
from mexit.errors import ConfigError
from mexit.runtime.types import Prediction, Runtime

logger = logging.getLogger(__name__)

DEFAULT_REPEATS = 20
_NS = 1_000_000_000


def _accepts_force_exit(predict: Callable[..., Any]) -> bool | None:
    """True/False when the signature says so; None when it cannot tell (``**kwargs`` or no signature)."""
    try:
        params = inspect.signature(predict).parameters
    except (TypeError, ValueError):
        return None
    if "force_exit" in params:
        return True
    return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else False


def _timed(predict: Callable[..., Prediction], x: np.ndarray, **kwargs: Any) -> tuple[int, Prediction]:
    start = time.perf_counter_ns()
    pred = predict(x, **kwargs)
    return time.perf_counter_ns() - start, pred


def _calibrate_forced(runtime: Runtime, inputs: np.ndarray, repeats: int, warmup: int) -> np.ndarray | None:
    """Median batch-1 wall time per exit with ``force_exit=k``; None when the runtime refuses the keyword."""
    num_exits = runtime.num_exits
    samples: list[list[int]] = [[] for _ in range(num_exits)]
    try:
        for k in range(num_exits):
            for w in range(warmup):
                _timed(runtime.predict, inputs[w % len(inputs)][None], force_exit=k)
        # Interleave the exits so that drift (thermal, other load) biases them all alike.
        for r in range(repeats):
            for k in range(num_exits):
                elapsed, pred = _timed(runtime.predict, inputs[r % len(inputs)][None], force_exit=k)
                if int(pred.exit_index[0]) != k:
                    logger.warning("runtime ignored force_exit=%d (sample left at exit %d); calibrating from "
                                   "observed exits instead", k, int(pred.exit_index[0]))
                    return None
                samples[k].append(elapsed)
    except TypeError:
        if _accepts_force_exit(runtime.predict) is True:
            raise  # it does take force_exit, so the TypeError is a real bug
        return None
    return np.array([np.median(s) for s in samples], dtype=np.float64) / _NS


def _calibrate_observed(runtime: Runtime, inputs: np.ndarray, repeats: int, warmup: int) -> np.ndarray:
    """Median batch-1 wall time per exit over the exits the calibration inputs naturally take."""
    num_exits = runtime.num_exits
    for w in range(warmup):
        runtime.predict(inputs[w % len(inputs)][None])
    samples: list[list[int]] = [[] for _ in range(num_exits)]
    for _ in range(repeats):
        for i in range(len(inputs)):
            elapsed, pred = _timed(runtime.predict, inputs[i : i + 1])
            samples[int(pred.exit_index[0])].append(elapsed)
    times = np.array([np.median(s) if s else np.nan for s in samples], dtype=np.float64) / _NS
    missing = np.flatnonzero(np.isnan(times))
    if missing.size == num_exits:
        raise ConfigError("calibration produced no timings; pass non-empty calibration_inputs")
    if missing.size:
        # No sample left there: borrow the next deeper exit's time (an over-estimate, so the guard
        # errs towards more delay), or the slowest observed exit for exits past the last observed one.
        observed = np.flatnonzero(~np.isnan(times))
        for k in missing:
            deeper = observed[observed > k]
            times[k] = times[deeper[0]] if deeper.size else np.nanmax(times)
        logger.warning("no calibration input left at exit(s) %s; their clean time was filled from deeper exits. "
                       "Pass more varied calibration_inputs, or a runtime that supports force_exit.",
                       missing.tolist())
    return times


def calibrate_clean_times(runtime: Runtime, calibration_inputs: np.ndarray | None = None, *,
                          repeats: int = DEFAULT_REPEATS, warmup: int = 2) -> tuple[np.ndarray, str]:
    """Per-exit clean time (seconds) and the method used (``"force_exit"`` or ``"observed"``).

    Uses the runtime's ``predict(x, force_exit=k)`` when it has one (any input then measures every
    exit; zeros are used if no inputs are given), else the exits the calibration inputs really take.
    """
    if repeats < 1:
        raise ConfigError(f"calibration repeats must be >= 1, got {repeats}")
    inputs = None if calibration_inputs is None else np.asarray(calibration_inputs, dtype=np.float32)
    if inputs is not None and (inputs.ndim < 1 or inputs.shape[0] == 0):
        raise ConfigError("calibration_inputs must be a non-empty batch (n, *input_shape)")
    if _accepts_force_exit(runtime.predict) is not False:
        probe = inputs if inputs is not None else np.zeros((1, *runtime.input_shape), dtype=np.float32)
        times = _calibrate_forced(runtime, probe, repeats, warmup)
        if times is not None:
            return times, "force_exit"
    if inputs is None:
        raise ConfigError("this runtime has no predict(..., force_exit=k), so GuardedRuntime needs "
                          "calibration_inputs (a batch of typical inputs) or explicit clean_times_s")
    return _calibrate_observed(runtime, inputs, repeats, warmup), "observed"


class GuardedRuntime:
    """A :class:`Runtime` that releases each response at the delay policy's target latency.

    ``clean_times_s`` skips calibration (e.g. times measured by an earlier audit); otherwise they are
    calibrated at construction from ``calibration_inputs`` with ``repeats`` batch-1 calls per exit.
    """

    def __init__(self, runtime: Runtime, policy: DelayPolicy, *, calibration_inputs: np.ndarray | None = None,
                 repeats: int = DEFAULT_REPEATS, clean_times_s: np.ndarray | None = None, warmup: int = 2) -> None:
        if not isinstance(runtime, Runtime):
            raise ConfigError(f"GuardedRuntime wraps a Runtime (input_shape, num_classes, num_exits, predict); "
                              f"got {type(runtime).__name__}")
        if not isinstance(policy, DelayPolicy):
            raise ConfigError(f"GuardedRuntime needs a delay policy with target_latency_s(); "
                              f"got {type(policy).__name__}")
        self._runtime = runtime
        self.policy = policy
        if clean_times_s is not None:
            times = check_clean_times(clean_times_s)
            method = "given"
        else:
            times, method = calibrate_clean_times(runtime, calibration_inputs, repeats=repeats, warmup=warmup)
        if times.size != runtime.num_exits:
            raise ConfigError(f"clean_times_s has {times.size} entries but the runtime has {runtime.num_exits} exits")
        self._clean_times_s = times
        self.calibration_method = method
        logger.info("GuardedRuntime clean times per exit (ms, %s): %s", method,
                    np.array2string(times * 1e3, precision=3))

    # -- the Runtime protocol -------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._runtime.input_shape

    @property
    def num_classes(self) -> int:
        return self._runtime.num_classes

    @property
    def num_exits(self) -> int:
        return self._runtime.num_exits

    @property
    def runtime(self) -> Runtime:
        """The wrapped runtime (unguarded: do not expose it to clients)."""
        return self._runtime

    @property
    def clean_times_s(self) -> np.ndarray:
        """Calibrated per-exit clean times in seconds (a copy)."""
        return self._clean_times_s.copy()

    def _infer(self, x: np.ndarray, full_depth: bool) -> tuple[Prediction, int]:
        """Prediction and the batch's release offset in ns (the latest per-sample target)."""
        pred = self._runtime.predict(x, full_depth=full_depth)
        if len(pred) == 0:
            return pred, 0
        targets = self.policy.target_latency_s(np.asarray(x), pred.exit_index, self._clean_times_s)
        return pred, round(float(np.max(targets)) * _NS)

    @staticmethod
    def _released(pred: Prediction, arrival_ns: int) -> Prediction:
        latency = time.perf_counter_ns() - arrival_ns
        return Prediction(probs=pred.probs, labels=pred.labels, exit_index=pred.exit_index,
                          latency_ns=np.full(len(pred), latency, dtype=np.int64))

    def predict(self, x: np.ndarray, *, full_depth: bool = False, arrival_ns: int | None = None) -> Prediction:
        """Predict, then block until the policy's release time. ``arrival_ns`` (``perf_counter_ns``)
        lets a server count from when the request arrived; default: when this call started."""
        arrival = time.perf_counter_ns() if arrival_ns is None else int(arrival_ns)
        pred, offset = self._infer(x, full_depth)
        release = arrival + offset
        while (remaining := release - time.perf_counter_ns()) > 0:
            time.sleep(remaining / _NS)
        return self._released(pred, arrival)

    async def predict_async(self, x: np.ndarray, *, full_depth: bool = False,
                            arrival_ns: int | None = None) -> Prediction:
        """Like :meth:`predict`, for servers: inference runs in a worker thread and the wait is an
        ``asyncio.sleep``, so other requests proceed while this one is held back."""
        arrival = time.perf_counter_ns() if arrival_ns is None else int(arrival_ns)
        pred, offset = await asyncio.to_thread(self._infer, x, full_depth)
        release = arrival + offset
        while (remaining := release - time.perf_counter_ns()) > 0:
            await asyncio.sleep(remaining / _NS)
        return self._released(pred, arrival)

    def describe(self) -> dict[str, Any]:
        """Policy settings and calibration, for reports and provenance (no secrets)."""
        policy = self.policy.describe() if hasattr(self.policy, "describe") else {"policy": type(self.policy).__name__}
        return {**policy, "clean_times_s": self._clean_times_s.tolist(), "calibration": self.calibration_method}

    def __repr__(self) -> str:
        return f"GuardedRuntime({self._runtime!r}, policy={self.policy!r})"
