"""GuardedRuntime against a fake numpy runtime with known per-exit times.

Timing assertions are lower bounds (the guard may never release early); upper bounds are generous,
because the test machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from mexit.defense import ConstantTimePadding, ExactHasher, GuardedRuntime, TimeGuard, calibrate_clean_times
from mexit.errors import ConfigError
from mexit.runtime.types import Runtime
from tests.defense._fakes import EXIT_TIMES_S, FakeRuntime, PlainFakeRuntime, inputs_for_exits

KEY = bytes(range(32))


def test_calibration_uses_force_exit_when_available() -> None:
    rt = FakeRuntime()
    times, method = calibrate_clean_times(rt, repeats=5)
    assert method == "force_exit"
    assert np.all(times >= np.asarray(EXIT_TIMES_S))
    assert times[0] < times[2]
    guarded = GuardedRuntime(rt, TimeGuard(0.001, KEY, ExactHasher()), repeats=3)
    assert guarded.calibration_method == "force_exit"
    assert isinstance(guarded, Runtime)
    assert (guarded.input_shape, guarded.num_classes, guarded.num_exits) == ((4,), 3, 3)


def test_calibration_falls_back_to_observed_exits(caplog) -> None:
    rt = PlainFakeRuntime()
    with pytest.raises(ConfigError, match="calibration_inputs"):
        GuardedRuntime(rt, ConstantTimePadding())
    x = inputs_for_exits([0, 1, 2, 2])
    times, method = calibrate_clean_times(rt, x, repeats=3)
    assert method == "observed"
    assert np.all(times >= np.asarray(EXIT_TIMES_S)) and times[0] < times[2]
    with caplog.at_level(logging.WARNING):
        partial, _ = calibrate_clean_times(rt, inputs_for_exits([0, 2]), repeats=2)
    assert "exit(s) [1]" in caplog.text
    assert partial[1] == partial[2]  # filled from the next deeper exit


def test_clean_times_can_be_given() -> None:
    rt = FakeRuntime()
    guarded = GuardedRuntime(rt, ConstantTimePadding(), clean_times_s=[0.01, 0.02, 0.03])
    assert rt.calls == 0 and guarded.calibration_method == "given"
    assert np.array_equal(guarded.clean_times_s, [0.01, 0.02, 0.03])
    with pytest.raises(ConfigError, match="3 exits"):
        GuardedRuntime(rt, ConstantTimePadding(), clean_times_s=[0.01, 0.02])
    with pytest.raises(ConfigError, match="Runtime"):
        GuardedRuntime(object(), ConstantTimePadding(), clean_times_s=[0.01])  # type: ignore[arg-type]


def test_predict_really_delays_to_the_target() -> None:
    clean = np.array([0.002, 0.004, 0.006])
    policy = TimeGuard(0.03, KEY, ExactHasher())
    guarded = GuardedRuntime(FakeRuntime(), policy, clean_times_s=clean)
    x = inputs_for_exits([0, 2, 1])
    for i in range(len(x)):
        target = policy.release_time_s(x[i], int(guarded.runtime.predict(x[i : i + 1]).exit_index[0]), clean)
        start = time.perf_counter_ns()
        pred = guarded.predict(x[i : i + 1])
        wall = (time.perf_counter_ns() - start) / 1e9
        assert pred.latency_ns[0] / 1e9 >= target
        assert wall >= target
        assert wall < target + 1.0
    batch = guarded.predict(x)
    assert np.array_equal(batch.exit_index, [0, 2, 1])
    assert len(set(batch.latency_ns.tolist())) == 1  # released together
    assert batch.latency_ns[0] / 1e9 >= policy.target_latency_s(x, batch.exit_index, clean).max()
    # The prediction itself is untouched.
    assert np.array_equal(batch.labels, guarded.runtime.predict(x).labels)


def test_padding_releases_at_the_final_exit_time() -> None:
    clean = np.array([0.002, 0.004, 0.006])
    x = inputs_for_exits([0])
    guarded = GuardedRuntime(FakeRuntime(), ConstantTimePadding(), clean_times_s=clean)
    assert guarded.predict(x).latency_ns[0] >= 0.006e9
    full = guarded.predict(x, full_depth=True)
    assert full.exit_index[0] == 2 and full.latency_ns[0] >= 0.006e9


def test_overrun_compute_is_not_delayed_further() -> None:
    # Clean times of 0 and no delay: the target is already past when compute ends.
    guarded = GuardedRuntime(FakeRuntime(), TimeGuard(0.0, KEY, ExactHasher()), clean_times_s=[0.0, 0.0, 0.0])
    pred = guarded.predict(inputs_for_exits([2]))
    assert EXIT_TIMES_S[2] * 1e9 <= pred.latency_ns[0] < 0.5e9


def test_predict_async_waits_without_blocking_others() -> None:
    hold = 0.25
    guarded = GuardedRuntime(FakeRuntime(), ConstantTimePadding(), clean_times_s=[hold, hold, hold])
    x = inputs_for_exits([0, 1, 2, 0, 1, 2, 0, 1])
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> tuple[float, list]:
        stop = asyncio.Event()
        tick_task = asyncio.create_task(ticker(stop))
        start = time.perf_counter()
        preds = await asyncio.gather(*(guarded.predict_async(x[i : i + 1]) for i in range(len(x))))
        elapsed = time.perf_counter() - start
        stop.set()
        await tick_task
        return elapsed, preds

    elapsed, preds = asyncio.run(main())
    assert all(p.latency_ns[0] >= hold * 1e9 for p in preds)
    assert elapsed >= hold
    assert elapsed < len(x) * hold / 2  # concurrent (~hold), not serial (8 x hold = 2 s)
    assert ticks >= 5  # the event loop kept running while responses were held
    assert [int(p.exit_index[0]) for p in preds] == [0, 1, 2, 0, 1, 2, 0, 1]


def test_target_counts_from_compute_start_not_from_a_queued_arrival() -> None:
    """Time spent queued before inference must not eat into the target (else a loaded server overruns it)."""
    clean = [0.02, 0.02, 0.02]
    queued = 0.03  # the request arrived 30 ms before this call (waiting behind others)
    for release_from, at_least in (("compute", queued + 0.02), ("arrival", 0.0)):
        guarded = GuardedRuntime(FakeRuntime(), ConstantTimePadding(), clean_times_s=clean, release_from=release_from)
        arrival = time.perf_counter_ns() - int(queued * 1e9)
        pred = guarded.predict(inputs_for_exits([0]), arrival_ns=arrival)
        assert pred.latency_ns[0] / 1e9 >= at_least
    # From arrival, the 20 ms target had already passed: an overrun, released at once.
    assert guarded.overruns == 1 and guarded.requests == 1
    with pytest.raises(ConfigError, match="release_from"):
        GuardedRuntime(FakeRuntime(), ConstantTimePadding(), clean_times_s=clean, release_from="queue")  # type: ignore[arg-type]
