"""GuardedRuntime: an early-exit runtime whose responses leave only at the delay policy's target time.

It wraps any :class:`mexit.runtime.types.Runtime` and is one itself, so the server (or an attack run
against a local deployment) uses it unchanged. At start-up it calibrates the clean time ``t_exit`` of
every exit (Algorithm 1, line 5): the median wall time of a batch-1 call that leaves at that exit. Per
request it computes the prediction, then holds the response until ``start + max_i target_i`` (``start``:
when inference began, so queueing is not part of the target; see ``release_from``) —
``time.sleep`` in :meth:`predict`, ``asyncio.sleep`` in :meth:`predict_async` so that a waiting response
does not hold up other requests. A request whose compute already overran its target returns at once
(the guard only ever adds time) and is counted in :attr:`GuardedRuntime.overruns`.

Calibration keeps every measurement per exit (:class:`~mexit.defense.calibration.CleanTimes`), not only
the median: padding and the optimal schedule release at high quantiles, and a policy with a ``fit``
method is fitted on them at construction. ``latency_ns`` of the returned prediction is the *released* latency,
what a client observes, the same for every sample of the batch since they leave together.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from mexit.defense.calibration import CleanTimes
from mexit.defense.timeguard import DelayPolicy, check_clean_times
from mexit.errors import ConfigError
from mexit.runtime.types import Prediction, Runtime, WrappedShape

logger = logging.getLogger(__name__)

DEFAULT_REPEATS = 20
_NS = 1_000_000_000
# The last stretch before a release is busy-waited: a sleep overshoots by an amount that grows with its
# length on a loaded machine, so a shallow exit (long sleep) would leave measurably later than a deep one
# (short sleep) — measured live on the default audit: padding's exit-ranking AUC fell to 0.16, i.e. inverted.
SPIN_NS = 300_000
# Refitting a fitted policy (padding, the optimal schedule) on the times it meets live: after at least
# REFIT_MIN_REQUESTS batch-1 requests with REFIT_OVERRUNS overruns since the last fit, each exit's calibration
# samples are shifted by how much slower its live LIVE_QUANTILE is (from the last LIVE_SAMPLES live times, with
# at least MIN_LIVE_PER_EXIT of them). Calibration runs predict back to back; served, the same call runs between
# HTTP parsing, thread hand-offs and the guard's own keyed target, and measured ~10 % slower at the median for
# the Location FCN-18-1 ×6 (exit 5: 1.84 vs 1.63-1.7 ms), so the slowest exit overran the schedule's last
# release in 30-65 of 300 requests and an exit stealer read 0.18-0.37 (1/K = 0.17) live. A shift, not the live
# samples themselves: their rare scheduling hiccups would become the p99.9 and double the added latency (measured:
# +4-6 ms instead of +1.3). At the 90th percentile, not the median: served times also spread wider. On top, a
# margin common to all exits grows at each refit by the median amount the overruns since the previous one
# exceeded their release, so repeated refits converge instead of re-deriving the same shift.
LIVE_QUANTILE = 0.9
REFIT_MIN_REQUESTS = 50
REFIT_OVERRUNS = 2
# After the first refit, the margin grows only while overruns stay above MARGIN_OVERRUN_RATE over at least
# MARGIN_MIN_REQUESTS requests: rare scheduling hiccups overrun any schedule and hit every exit alike, and
# chasing them tripled the added latency (+3.8-5.0 ms against +2.4-2.5 ms) for little (oracle 0.19-0.21).
MARGIN_MIN_REQUESTS = 200
MARGIN_OVERRUN_RATE = 0.01
# ...except when one exit overruns in EXIT_REFIT_SHARE of its requests (at least REFIT_OVERRUNS times, over at least
# REFIT_MIN_REQUESTS requests in all): then its shift is wrong, not the tail, and the guard refits at once, re-measuring
# the shifts without growing the margin (adding what the overruns missed by too raised every release by 0.4-0.9 ms for
# good). The first refit comes after ~50 requests, when a deep exit has a handful of live times, and its shift can fall
# short: in three Location audits the slowest exit then overran in 18-21 of its next 28 answers until the 200-request
# rule refitted. Tried and dropped: a first refit after 20 requests (fewer overruns before it, but the slowest exit's
# shift from 2-3 live times fell shorter still), and capping a sparsely measured exit's shift at the well-measured
# exits' largest (served slowdown grows with depth: the slowest exit, capped, overran 25-29 times of 217).
EXIT_REFIT_SHARE = 0.25
# Relaxing: a load spike grows the margin and the live shift; a relaxation undoes it once the spike is over. After
# the first refit requests are also counted in windows of MARGIN_MIN_REQUESTS (or WINDOW_MAX_NS once they hold
# REFIT_MIN_REQUESTS, so that a schedule a spike made slow is not also slow to relax). A relaxation takes three
# things: RELAX_WINDOWS windows in a row with at most RELAX_WINDOW_OVERRUNS overruns each; fewer requests in flight
# in each of them (on average, as the requests were counted) than RELAX_LOAD_FRACTION of those since the refit
# before the last growing one; and, on the live times of those windows, the slowest exit's shift fallen by
# RELAX_DROP_FRACTION of itself (and by RELAX_MIN_CHANGE_S). The guard then refits with that shift and the margin
# times MARGIN_RELAX_FACTOR (none below MARGIN_FLOOR_S), so a spike's cost does not stay for the life of the server
# (benchmarks/defense_throughput.py, after_load). Quiet windows and lower live times alone are not enough: under a
# closed-loop load the defense's own delay lowers the contention it measures, and relaxing on them alternated with
# growing while the load went on (measured: 11-15 % of requests overran instead of 1.5-1.9 %); the requests in
# flight do not fall while the load lasts. A slowdown that does not come with more requests in flight (a noisy
# neighbour) therefore keeps its schedule. An exit with fewer than MIN_LIVE_PER_EXIT quiet times takes the largest
# shift of the others, no more than its own (contention slows every exit alike). After a relaxation, refits measure
# the shift on the live times since it only: on the whole window, the next refit brought the passed load's shift
# straight back.
WINDOW_MAX_NS = 2_000_000_000
RELAX_WINDOWS = 2
RELAX_WINDOW_OVERRUNS = 1
MARGIN_RELAX_FACTOR = 0.25
MARGIN_FLOOR_S = 20e-6
RELAX_MIN_CHANGE_S = 20e-6
RELAX_DROP_FRACTION = 0.5
RELAX_LOAD_FRACTION = 0.5
LIVE_SAMPLES = 2000
# Three, not ten: the first refit comes after ~50 requests, when a rare slow exit has only a handful of live times;
# with ten it got no shift and kept overrunning (Location audit: 5-7 of exit 4's 36 answers, live oracle 0.25-0.28
# in 4 of 5 reruns); with three (their p90 is about their maximum) 0-1 of 36, oracle 0.17-0.21 in 3 of 3.
MIN_LIVE_PER_EXIT = 3


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


def _calibrate_forced(runtime: Runtime, inputs: np.ndarray, repeats: int, warmup: int) -> list[list[int]] | None:
    """Batch-1 wall times (ns) per exit with ``force_exit=k``; None when the runtime refuses the keyword."""
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
    return samples


def _calibrate_observed(runtime: Runtime, inputs: np.ndarray, repeats: int, warmup: int) -> list[list[int]]:
    """Batch-1 wall times (ns) per exit over the exits the calibration inputs naturally take."""
    num_exits = runtime.num_exits
    for w in range(warmup):
        runtime.predict(inputs[w % len(inputs)][None])
    samples: list[list[int]] = [[] for _ in range(num_exits)]
    for _ in range(repeats):
        for i in range(len(inputs)):
            elapsed, pred = _timed(runtime.predict, inputs[i : i + 1])
            samples[int(pred.exit_index[0])].append(elapsed)
    if not any(samples):
        raise ConfigError("calibration produced no timings; pass non-empty calibration_inputs")
    missing = [k for k in range(num_exits) if not samples[k]]
    if missing:
        # CleanTimes.filled() borrows the next deeper exit's times (an over-estimate, so the guard errs
        # towards more delay), or the slowest observed exit's for exits past the last observed one.
        logger.warning("no calibration input left at exit(s) %s; their clean time is filled from deeper exits. "
                       "Pass more varied calibration_inputs, or a runtime that supports force_exit.", missing)
    return samples


def _natural_counts(runtime: Runtime, inputs: np.ndarray | None) -> np.ndarray | None:
    """How many calibration inputs take each exit (the exit shares), from one batched prediction."""
    if inputs is None:
        return None
    exits = np.asarray(runtime.predict(inputs).exit_index, dtype=np.int64)
    return np.bincount(exits, minlength=runtime.num_exits)[: runtime.num_exits]


def calibrate_samples(runtime: Runtime, calibration_inputs: np.ndarray | None = None, *,
                      repeats: int = DEFAULT_REPEATS, warmup: int = 2) -> tuple[CleanTimes, str]:
    """Every batch-1 clean-time measurement per exit (seconds) and the method (``"force_exit"``/``"observed"``).

    Uses the runtime's ``predict(x, force_exit=k)`` when it has one (any input then measures every
    exit; zeros are used if no inputs are given), else the exits the calibration inputs really take.
    The exit shares are those of the calibration inputs (uniform under ``force_exit`` without inputs).
    """
    if repeats < 1:
        raise ConfigError(f"calibration repeats must be >= 1, got {repeats}")
    inputs = None if calibration_inputs is None else np.asarray(calibration_inputs, dtype=np.float32)
    if inputs is not None and (inputs.ndim < 1 or inputs.shape[0] == 0):
        raise ConfigError("calibration_inputs must be a non-empty batch (n, *input_shape)")
    if _accepts_force_exit(runtime.predict) is not False:
        probe = inputs if inputs is not None else np.zeros((1, *runtime.input_shape), dtype=np.float32)
        forced = _calibrate_forced(runtime, probe, repeats, warmup)
        if forced is not None:
            ns = [np.asarray(v, dtype=np.float64) / _NS for v in forced]
            return CleanTimes.from_samples(ns, _natural_counts(runtime, inputs)), "force_exit"
    if inputs is None:
        raise ConfigError("this runtime has no predict(..., force_exit=k), so GuardedRuntime needs "
                          "calibration_inputs (a batch of typical inputs) or explicit clean_times_s")
    observed = _calibrate_observed(runtime, inputs, repeats, warmup)
    ns = [np.asarray(v, dtype=np.float64) / _NS for v in observed]
    return CleanTimes.from_samples(ns, np.array([len(v) for v in observed]) // repeats), "observed"


def calibrate_clean_times(runtime: Runtime, calibration_inputs: np.ndarray | None = None, *,
                          repeats: int = DEFAULT_REPEATS, warmup: int = 2) -> tuple[np.ndarray, str]:
    """Per-exit median clean time (seconds) and the method used; see :func:`calibrate_samples`."""
    clean, method = calibrate_samples(runtime, calibration_inputs, repeats=repeats, warmup=warmup)
    return clean.medians(), method


@dataclass
class _Tally:
    """Requests and overruns counted since ``start_ns``, with the requests in flight summed as each was counted."""

    start_ns: int = field(default_factory=time.perf_counter_ns)
    requests: int = 0
    overruns: int = 0
    in_flight: int = 0
    exit_requests: Counter[int] = field(default_factory=Counter)  # under each request's deepest exit
    exit_overruns: Counter[int] = field(default_factory=Counter)
    #: batch-1 requests with a live time, per exit, under whichever schedule timed them (the refit's live samples)
    live_exits: Counter[int] = field(default_factory=Counter)

    def add(self, over: bool, in_flight: int, exit_k: int | None = None) -> None:
        self.requests += 1
        self.overruns += over
        self.in_flight += in_flight
        if exit_k is not None:
            self.exit_requests[exit_k] += 1
            self.exit_overruns[exit_k] += over

    def an_exit_overruns(self, at_least: int, share: float) -> bool:
        """Whether some exit overran at least ``at_least`` times and in at least ``share`` of its requests."""
        return any(o >= at_least and o >= share * self.exit_requests[k] for k, o in self.exit_overruns.items())

    @property
    def mean_in_flight(self) -> float:
        return self.in_flight / max(self.requests, 1)


class _Inference(NamedTuple):
    """One call's prediction; its release offset in ns (the latest per-sample target) and when compute began; the live
    time (s) the refit learns from (compute and keyed target of a batch-1 request, None for others); and the number
    of the schedule that timed it."""

    pred: Prediction
    offset_ns: int
    start_ns: int
    live_s: float | None
    schedule: int


def _spin_until(release_ns: int) -> None:
    """Busy-wait (yielding the GIL) until ``perf_counter_ns() >= release_ns``; at most ~SPIN_NS after a sleep."""
    while time.perf_counter_ns() < release_ns:
        time.sleep(0)


class GuardedRuntime(WrappedShape):
    """A :class:`Runtime` that releases each response at the delay policy's target latency.

    ``clean_times`` (distributions) or ``clean_times_s`` (medians only: enough for TimeGuard, not for
    padding or the optimal schedule) skip calibration (e.g. times measured by an earlier audit);
    otherwise they are calibrated at construction from ``calibration_inputs`` with ``repeats`` batch-1
    calls per exit. A policy with ``fit(CleanTimes)`` is fitted here, so a policy that cannot be
    calibrated fails at construction, never at the first request.

    ``release_from="compute"`` (default) counts the target from when inference starts, so time spent
    queueing behind other requests is added on top instead of eating into the target: counted from arrival
    (``"arrival"``, the former behaviour), a loaded server overruns almost every target (measured: 99.7 % at
    concurrency 8 on a compute-bound toy runtime) and releases at completion, which shows the exit again.

    ``adapt=True`` (default; policies with ``fit`` and clean-time distributions): the guard records how long each
    batch-1 request's compute and keyed target took per exit, and when the schedule overruns (see
    ``REFIT_*``) it refits a copy of the policy on the calibration samples shifted by each exit's live excess
    (at ``LIVE_QUANTILE``), in a background thread, and swaps it in; while overruns stay above
    ``MARGIN_OVERRUN_RATE`` a common margin grows at each further refit, and one exit overrunning in
    ``EXIT_REFIT_SHARE`` of its requests refits at once without growing it (its shift was wrong). Only requests
    released by the schedule in force count towards the next refit. Once overruns have stayed rare for a while,
    with fewer requests in flight than when it last grew (``RELAX_*``), it refits again with a quarter of the margin
    and the live shift of now, so a load spike's cost goes away with the spike. The schedule is refitted as a whole,
    never per request, so it stays a function of the calibration; the refit only keeps the slowest exit's answers
    from arriving after the schedule's last release. :meth:`describe` reports every refit (``refit_history``).
    """

    def __init__(self, runtime: Runtime, policy: DelayPolicy, *, calibration_inputs: np.ndarray | None = None,
                 repeats: int = DEFAULT_REPEATS, clean_times_s: np.ndarray | None = None, warmup: int = 2,
                 clean_times: CleanTimes | None = None,
                 release_from: Literal["compute", "arrival"] = "compute", adapt: bool = True) -> None:
        if not isinstance(runtime, Runtime):
            raise ConfigError(f"GuardedRuntime wraps a Runtime (input_shape, num_classes, num_exits, predict); "
                              f"got {type(runtime).__name__}")
        if not isinstance(policy, DelayPolicy):
            raise ConfigError(f"GuardedRuntime needs a delay policy with target_latency_s(); "
                              f"got {type(policy).__name__}")
        self._wrapped = runtime
        clean: CleanTimes | None = clean_times
        if clean is not None:
            times, method = clean.medians(), "given"
        elif clean_times_s is not None:
            times = check_clean_times(clean_times_s)
            method = "given"
        else:
            clean, method = calibrate_samples(runtime, calibration_inputs, repeats=repeats, warmup=warmup)
            times = clean.medians()
        if times.size != runtime.num_exits:
            raise ConfigError(f"clean_times_s has {times.size} entries but the runtime has {runtime.num_exits} exits")
        fit = getattr(policy, "fit", None)
        if callable(fit):
            if clean is None:
                raise ConfigError(f"{type(policy).__name__} needs clean-time distributions: pass clean_times "
                                  f"(CleanTimes) or let GuardedRuntime calibrate, not clean_times_s")
            fit(clean)
        # the policy, the medians it reads and the schedule's number (0, then one more per refit), swapped together
        self._fitted: tuple[DelayPolicy, np.ndarray, int] = (policy, times, 0)
        self.clean_times = clean
        self.calibration_method = method
        if release_from not in ("compute", "arrival"):
            raise ConfigError(f"release_from must be 'compute' or 'arrival', got {release_from!r}")
        self.release_from = release_from
        self._total = _Tally()  # every request since start-up, and per deepest exit
        self.refits = 0
        self._calibrated = clean
        self._adaptive = bool(adapt) and callable(fit) and clean is not None
        self._live: list[deque[float]] = [deque(maxlen=LIVE_SAMPLES) for _ in range(runtime.num_exits)]
        self._refit_lock = threading.Lock()
        self._refitting = False
        self._since_refit = _Tally()
        self._window = _Tally()  # the current window (see RELAX_*)
        self._quiet_windows = 0
        self._in_flight = 0  # requests between entering predict and their release
        self._recent_in_flight: deque[float] = deque(maxlen=RELAX_WINDOWS)  # its mean in the last windows
        self._grown_in_flight = 0.0  # the mean in flight in the window that last grew the schedule
        self._relax_exits: list[int] | None = None  # live samples per exit since the last relaxation, if any
        self._recent_exits: deque[list[int]] = deque(maxlen=RELAX_WINDOWS)  # the same for the last windows
        self._excess: list[float] = []  # seconds by which overruns since the last refit missed their release
        self.refit_margin_s = 0.0
        self.relaxes = 0
        self._shifts_s = np.zeros(runtime.num_exits)  # each exit's live shift in the schedule in force
        self._history: list[dict[str, Any]] = []  # one entry per refit: when, the counts before it, what it set
        logger.info("GuardedRuntime clean times per exit (ms, %s): %s", method,
                    np.array2string(times * 1e3, precision=3))

    # -- the Runtime protocol -------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        """The wrapped runtime (unguarded: do not expose it to clients)."""
        return self._wrapped

    @property
    def policy(self) -> DelayPolicy:
        """The delay policy in force (a refit replaces it, see ``adapt``)."""
        return self._fitted[0]

    @property
    def clean_times_s(self) -> np.ndarray:
        """Calibrated per-exit clean times in seconds (a copy)."""
        return self._fitted[1].copy()

    def _infer(self, x: np.ndarray, full_depth: bool) -> _Inference:
        """The prediction and what the guard needs to release and count it (see :class:`_Inference`)."""
        start = time.perf_counter_ns()
        pred = self._wrapped.predict(x, full_depth=full_depth)
        policy, clean_s, schedule = self._fitted
        if len(pred) == 0:
            return _Inference(pred, 0, start, None, schedule)
        targets = policy.target_latency_s(np.asarray(x), pred.exit_index, clean_s)
        live = (time.perf_counter_ns() - start) / _NS if self._adaptive and len(pred) == 1 and not full_depth else None
        return _Inference(pred, round(float(np.max(targets)) * _NS), start, live, schedule)

    def _release_ns(self, arrival: int, start: int, offset: int) -> int:
        return (max(arrival, start) if self.release_from == "compute" else arrival) + offset

    def _count(self, release_ns: int, inference: _Inference) -> None:
        """Count the request, and an overrun when compute finished after the release time (which may start a
        refit, see ``adapt``), each also under the request's deepest exit; keep its live time for the refit. All under
        the lock, so concurrent requests neither lose counts nor interleave with a refit reading them. Only requests
        released by the schedule in force count towards the next refit: one timed by the schedule a refit has
        replaced says nothing about the new one (counted, such overruns grew the margin by 1.2 ms in a Location
        audit whose new schedule had not overrun once)."""
        late = time.perf_counter_ns() - release_ns
        over = late > 0
        pred, live_s = inference.pred, inference.live_s
        exit_k = int(np.max(pred.exit_index)) if len(pred) else None
        with self._refit_lock:
            self._total.add(over, self._in_flight, exit_k)
            if exit_k is not None and live_s is not None:  # batch 1: exit_k is the request's exit
                self._live[exit_k].append(live_s)
                self._window.live_exits[exit_k] += 1
                if self._relax_exits is not None:
                    self._relax_exits[exit_k] += 1
            if not self._adaptive or inference.schedule != self._fitted[2]:
                return
            self._since_refit.add(over, self._in_flight, exit_k)
            self._window.add(over, self._in_flight, exit_k)
            if over and len(self._excess) < LIVE_SAMPLES:
                self._excess.append(late / _NS)
            if self._refitting:
                return
            # grow: as soon as the schedule in force has overrun a few times (the first refit), later while
            # overruns since the last refit stay above MARGIN_OVERRUN_RATE, or at once when one exit overruns in
            # EXIT_REFIT_SHARE of its requests (see there)
            since = self._since_refit
            n, overran = since.requests, since.overruns
            needed = ((REFIT_OVERRUNS, REFIT_MIN_REQUESTS) if self.refits == 0 else
                      (max(REFIT_OVERRUNS, MARGIN_OVERRUN_RATE * n), MARGIN_MIN_REQUESTS))
            relax = False
            wrong_shift = bool(self.refits) and n >= REFIT_MIN_REQUESTS and since.an_exit_overruns(
                REFIT_OVERRUNS, EXIT_REFIT_SHARE)
            tail = overran >= needed[0] and n >= needed[1]
            if tail or wrong_shift:
                self._grown_in_flight = self._since_refit.mean_in_flight
            elif not self._window_ended():
                return
            else:  # relax: see RELAX_*
                if (self._quiet_windows < RELAX_WINDOWS or not self._shifts_s.any()
                        or max(self._recent_in_flight) > RELAX_LOAD_FRACTION * self._grown_in_flight):
                    return
                relax = True
            self._quiet_windows = 0
            self._since_refit, self._window = _Tally(), _Tally()
            self._refitting = True
            # a relaxation measures the quiet windows' live times; a refit after one, those since it: a load that
            # has passed must not come back through the next refit's shift
            fresh = np.sum(list(self._recent_exits), axis=0) if relax else self._relax_exits
            live = [np.fromiter(d, dtype=np.float64) for d in self._live]
            if fresh is not None:
                live = [v[max(0, len(v) - int(m)):] for v, m in zip(live, fresh, strict=True)]
            # the margin grows with the overruns' excess only on the tail rule: a wrong shift is re-measured, and
            # adding what it missed by as well (0.4-0.9 ms) raised every exit's release for good
            excess, self._excess = (self._excess if tail or relax else []), []
        threading.Thread(target=self._refit, args=(live, excess, relax), name="mexit-guard-refit", daemon=True).start()

    def _refit(self, live: list[np.ndarray], excess: list[float], relax: bool = False) -> None:
        """Fit a copy of the policy on the calibration samples, each exit's shifted by how much slower its
        ``live`` times are at ``LIVE_QUANTILE``, plus the common margin — grown by the median ``excess`` of the
        overruns since the last refit, or shrunk (``relax``) after quiet windows — and swap it in."""
        try:
            base = self._calibrated
            assert base is not None
            if relax:
                margin = self.refit_margin_s * MARGIN_RELAX_FACTOR
                margin = margin if margin >= MARGIN_FLOOR_S else 0.0
            else:
                margin = self.refit_margin_s + (float(np.median(excess)) if self.refits and excess else 0.0)
            enough = np.array([cal.size > 0 and live[k].size >= MIN_LIVE_PER_EXIT
                               for k, cal in enumerate(base.samples)])
            shifts = np.array([max(0.0, float(np.quantile(live[k], LIVE_QUANTILE) - np.quantile(cal, LIVE_QUANTILE)))
                               if enough[k] else 0.0 for k, cal in enumerate(base.samples)])
            if relax:  # only once the live slowdown itself has fallen: a load that goes on keeps its schedule
                if not enough.any():
                    return
                # an exit with too few quiet times takes the largest shift of the others, no more than its own
                # (contention slows every exit alike). Not when growing: raising rare exits to the largest shift
                # made the optimal schedule overrun more, at 0.27-0.45 of undefended throughput instead of 0.53-0.76.
                shifts = np.where(enough, shifts, np.minimum(self._shifts_s, shifts[enough].max()))
                before = float(self._shifts_s.max())
                if before - float(shifts.max()) < max(RELAX_MIN_CHANGE_S, RELAX_DROP_FRACTION * before):
                    return
            else:  # growing: an exit with too few live times keeps the shift it had, or takes the nearest
                # shallower exit's, whichever is larger (deeper exits run at least as slowly; with none, exit 2 of a
                # Location audit overran 5 of its 66 answers)
                shifts = np.array([s_k if enough[k] else max(
                    self._shifts_s[k], next((shifts[j] for j in range(k - 1, -1, -1) if enough[j]), 0.0))
                    for k, s_k in enumerate(shifts)])
            clean = CleanTimes.from_samples([cal + shift + margin for cal, shift in zip(base.samples, shifts,
                                                                                         strict=True)], base.counts)
            policy = copy.deepcopy(self.policy)
            policy.fit(clean)  # type: ignore[attr-defined]
            with self._refit_lock:  # swapped in as a whole, between two requests' counts
                self._history.append({"relax": relax, "at_request": self.requests,
                                      "overruns_per_exit_before": self._per_exit(self._total.exit_overruns),
                                      "requests_per_exit_before": self._per_exit(self._total.exit_requests),
                                      "live_shift_s": shifts.tolist(), "margin_s": margin})
                self._fitted = (policy, clean.medians(), self._fitted[2] + 1)
                # what was counted since the refit began was released by the schedule it replaces: start afresh
                self._since_refit, self._window, self._excess = _Tally(), _Tally(), []
                self.clean_times = clean
                self.refit_margin_s = margin
                self._shifts_s = shifts
                self.refits += 1
                self.relaxes += relax
                if relax:
                    self._relax_exits = [0] * len(base.samples)
            logger.info("GuardedRuntime %s on %d live samples (refit %d, margin %.3f ms)",
                        "relaxed its schedule after quiet windows" if relax else "refitted after overruns",
                        sum(len(v) for v in live), self.refits, margin * 1e3)
        except Exception:  # a refit is an improvement, never a reason to stop serving
            logger.exception("GuardedRuntime could not refit its policy; keeping the current one")
        finally:
            with self._refit_lock:
                self._refitting = False

    def _window_ended(self) -> bool:
        """Close the current window if it is over (MARGIN_MIN_REQUESTS requests, or WINDOW_MAX_NS with at least
        REFIT_MIN_REQUESTS) and record it for a relaxation (after the first refit only); whether it ended."""
        window, n = self._window, self._window.requests
        young = time.perf_counter_ns() - window.start_ns < WINDOW_MAX_NS
        if self.refits == 0 or (n < MARGIN_MIN_REQUESTS and (n < REFIT_MIN_REQUESTS or young)):
            return False
        self._quiet_windows = self._quiet_windows + 1 if window.overruns <= RELAX_WINDOW_OVERRUNS else 0
        self._recent_exits.append(self._per_exit(window.live_exits))
        self._recent_in_flight.append(window.mean_in_flight)
        self._window = _Tally()
        return True

    @property
    def requests(self) -> int:
        """Requests answered since start-up."""
        return self._total.requests

    @property
    def overruns(self) -> int:
        """Requests whose compute finished after their release time (they left at once, showing their timing)."""
        return self._total.overruns

    def _per_exit(self, counts: Counter[int]) -> list[int]:
        return [counts[k] for k in range(self.num_exits)]

    def _enter(self) -> None:
        with self._refit_lock:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._refit_lock:
            self._in_flight -= 1

    @staticmethod
    def _released(pred: Prediction, arrival_ns: int) -> Prediction:
        latency = time.perf_counter_ns() - arrival_ns
        return Prediction(probs=pred.probs, labels=pred.labels, exit_index=pred.exit_index,
                          latency_ns=np.full(len(pred), latency, dtype=np.int64))

    def predict(self, x: np.ndarray, *, full_depth: bool = False, arrival_ns: int | None = None) -> Prediction:
        """Predict, then block until the policy's release time. ``arrival_ns`` (``perf_counter_ns``)
        lets a server count from when the request arrived; default: when this call started."""
        arrival = time.perf_counter_ns() if arrival_ns is None else int(arrival_ns)
        self._enter()
        try:
            inference = self._infer(x, full_depth)
            pred = inference.pred
            release = self._release_ns(arrival, inference.start_ns, inference.offset_ns)
            self._count(release, inference)
            while (remaining := release - time.perf_counter_ns()) > SPIN_NS:
                time.sleep((remaining - SPIN_NS) / _NS)
            _spin_until(release)
        finally:
            self._leave()
        return self._released(pred, arrival)

    async def predict_async(self, x: np.ndarray, *, full_depth: bool = False,
                            arrival_ns: int | None = None) -> Prediction:
        """Like :meth:`predict`, for servers: inference runs in a worker thread and the wait is an
        ``asyncio.sleep``, so other requests proceed while this one is held back."""
        arrival = time.perf_counter_ns() if arrival_ns is None else int(arrival_ns)
        self._enter()
        try:
            inference = await asyncio.to_thread(self._infer, x, full_depth)
            pred = inference.pred
            release = self._release_ns(arrival, inference.start_ns, inference.offset_ns)
            self._count(release, inference)
            while (remaining := release - time.perf_counter_ns()) > 2 * SPIN_NS:
                await asyncio.sleep((remaining - 2 * SPIN_NS) / _NS)
            if release > time.perf_counter_ns():  # the last stretch in a worker thread, not blocking the loop
                await asyncio.to_thread(_spin_until, release)
        finally:
            self._leave()
        return self._released(pred, arrival)

    def describe(self) -> dict[str, Any]:
        """Policy settings and calibration, for reports and provenance (no secrets)."""
        policy = self.policy.describe() if hasattr(self.policy, "describe") else {"policy": type(self.policy).__name__}
        out = {**policy, "clean_times_s": self._fitted[1].tolist(), "calibration": self.calibration_method,
               "requests": self.requests, "overruns": self.overruns,
               "requests_per_exit": self._per_exit(self._total.exit_requests),
               "overruns_per_exit": self._per_exit(self._total.exit_overruns), "adapt": self._adaptive,
               "refits": self.refits,
               "relaxes": self.relaxes, "refit_margin_s": self.refit_margin_s,
               "live_shift_s": self._shifts_s.tolist(),
               "live_samples": [len(d) for d in self._live],
               "refit_history": [dict(h) for h in self._history]}
        if self.clean_times is not None:
            out["clean_time_quantiles"] = self.clean_times.describe()
        return out

    def __repr__(self) -> str:
        return f"GuardedRuntime({self._wrapped!r}, policy={self.policy!r})"
