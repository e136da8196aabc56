"""The jittery test deployment: its delay distribution, the wrapper's semantics, and serving it by factory."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from mexit.errors import ConfigError
from mexit.serve import OIPClient, ServerProcess
from mexit.serve.jitter import JitterModel, JitteryRuntime, jittery_toy
from mexit.serve.testing import ToyRuntime


def test_delay_is_lognormal_with_the_given_median_and_shape() -> None:
    d = JitterModel(overhead_ms=3.0, sigma=0.3, spike_p=0.0, seed=1).draw(20000)
    assert np.median(d) == pytest.approx(3e-3, rel=0.02)
    assert np.log(d).std() == pytest.approx(0.3, rel=0.03)
    assert stats.kstest(np.log(d / 3e-3) / 0.3, "norm").pvalue > 0.01


def test_spikes_make_the_tail_heavy() -> None:
    calm = JitterModel(overhead_ms=3.0, sigma=0.1, spike_p=0.0, seed=2).draw(20000)
    spiky = JitterModel(overhead_ms=3.0, sigma=0.1, spike_p=0.05, spike_ms=5.0, seed=2).draw(20000)
    assert np.median(spiky) == pytest.approx(np.median(calm), rel=0.05)  # the body is unchanged
    assert np.quantile(spiky, 0.99) > 2 * np.quantile(calm, 0.99)  # the tail is not
    assert stats.kurtosis(spiky) > 10 > stats.kurtosis(calm)
    assert np.mean(spiky > np.quantile(calm, 0.999)) == pytest.approx(0.05 * 0.8, abs=0.015)


def test_same_seed_same_delays_and_bad_parameters() -> None:
    assert np.array_equal(JitterModel(seed=5).draw(50), JitterModel(seed=5).draw(50))
    for bad in ({"overhead_ms": 0.0}, {"sigma": -1.0}, {"spike_p": 1.0}, {"spike_ms": -2.0}):
        with pytest.raises(ConfigError):
            JitterModel(**bad)


def test_wrapper_adds_the_delay_outside_the_model() -> None:
    inner = ToyRuntime(seed=3)
    slept: list[float] = []
    runtime = JitteryRuntime(inner, JitterModel(overhead_ms=4.0, sigma=0.0, spike_p=0.0), sleep=slept.append)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    pred, ref = runtime.predict(x), inner.predict(x)
    assert slept == [pytest.approx(4e-3)]  # one delay per request, after the model
    assert np.array_equal(pred.exit_index, ref.exit_index) and np.allclose(pred.probs, ref.probs)
    assert (pred.latency_ns >= 4_000_000).all()
    assert (runtime.num_exits, runtime.num_classes, runtime.input_shape) == (3, 4, (16,))
    assert runtime.threshold == inner.threshold  # other attributes come from the inner runtime


def test_real_sleep_takes_at_least_the_overhead() -> None:
    runtime = jittery_toy(overhead_ms=3.0, sigma=0.0, spike_p=0.0, seed=7)
    x = np.zeros((1, 16), dtype=np.float32)
    start = time.perf_counter()
    runtime.predict(x)
    assert time.perf_counter() - start >= 3e-3


def test_served_by_factory_adds_milliseconds_to_the_round_trip() -> None:
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    with ServerProcess(factory="mexit.serve.jitter:jittery_toy",
                       factory_kwargs={"overhead_ms": 3.0, "sigma": 0.1, "seed": 7}, expose_exit=True) as server, \
            OIPClient(server.url, server.model_name) as client:
        rtts = [client.infer(x).rtt_ns for _ in range(15)]
        exit_k = int(client.infer(x).outputs["exit_index"][0])
    assert np.median(rtts) >= 3e6
    assert exit_k == int(ToyRuntime(seed=0).predict(x).exit_index[0])
