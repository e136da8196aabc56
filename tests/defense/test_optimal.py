"""The optimal release schedule: meets its Bayes bound, equals padding at ε = 0, deterministic per input and key."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mexit.defense import CleanTimes, ExactHasher, OptimalSchedule, QuantilePadding, bayes_balanced_accuracy
from mexit.defense.bayes import schedule_bound
from mexit.defense.optimal import solve_schedule
from mexit.errors import ConfigError

KEY = bytes(range(32))


def _clean(seed: int = 0, n: int = 1000) -> tuple[CleanTimes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    exits = rng.choice(4, n, p=[0.15, 0.1, 0.15, 0.6])
    lat = (1.0 + 0.5 * exits + rng.normal(0, 0.03, n)) * 1e-3
    return CleanTimes.from_recorded(lat, exits, 4), lat, exits


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.1, 0.3, 0.75])
def test_schedule_meets_its_bound(eps: float) -> None:
    clean, lat, exits = _clean()
    opt = OptimalSchedule(eps, KEY, ExactHasher()).fit(clean)
    assert opt.bound is not None and opt.bound <= 0.25 + eps + 1e-7
    assert opt.schedule is not None and np.allclose(opt.schedule.sum(axis=1), 1.0)
    low = clean.quantiles(opt.quantile)
    for k in range(4):  # no release before the exit's calibrated quantile
        assert opt.grid_s[opt.schedule[k] > 1e-9].min() >= low[k] - 1e-12
    # The exact Bayes bound (with the compute jitter) agrees with the schedule's own bound.
    clean_by_exit = [lat[exits == k] for k in range(4)]
    bayes = bayes_balanced_accuracy(clean_by_exit, lambda k, g: opt.release_cdf(k, g))
    assert bayes == pytest.approx(opt.bound, abs=0.01)


def test_epsilon_zero_is_padding_and_latency_falls_with_epsilon() -> None:
    clean, _, _ = _clean()
    pad = QuantilePadding(0.999).fit(clean)
    zero = OptimalSchedule(0.0, KEY, ExactHasher()).fit(clean)
    assert zero.mean_release_s() == pytest.approx(pad.release_s, rel=1e-9)
    means = [OptimalSchedule(e, KEY, ExactHasher()).fit(clean).mean_release_s() for e in (0.0, 0.05, 0.2, 0.5)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(means)) and means[-1] < means[0]
    # At the top of the range (1 - 1/K) every exit may release at its own quantile: no delay beyond it.
    top = OptimalSchedule(0.75, KEY, ExactHasher()).fit(clean)
    assert top.mean_release_s() == pytest.approx(float(clean.shares @ clean.quantiles(0.999)), rel=1e-6)


def test_p99_limit_is_respected_or_refused() -> None:
    shares, low = np.array([0.6, 0.39, 0.01]), np.array([1.0, 1.5, 2.0])
    t, q = solve_schedule(shares, low, 0.35, p99_s=1.9)
    assert float(shares @ q[:, t > 1.9].sum(axis=1)) <= 0.01 + 1e-9
    assert schedule_bound(q) <= 1 / 3 + 0.35 + 1e-9
    # Padding (eps = 0) must release everything at 2.0: a p99 limit below it cannot be met.
    with pytest.raises(ConfigError, match="no solution"):
        solve_schedule(shares, low, 0.0, p99_s=1.9)


def test_release_is_deterministic_per_input_and_key() -> None:
    clean, _, _ = _clean()
    rng = np.random.default_rng(3)
    x = rng.random((200, 6)).astype(np.float32)
    exits = np.zeros(200, dtype=np.int64)
    first = OptimalSchedule(0.1, KEY, ExactHasher()).fit(clean).target_latency_s(x, exits, clean.medians())
    again = OptimalSchedule(0.1, KEY, ExactHasher()).fit(clean).target_latency_s(x, exits, clean.medians())  # restart
    other = OptimalSchedule(0.1, bytes(32), ExactHasher()).fit(clean).target_latency_s(x, exits, clean.medians())
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.unique(first).size > 1  # exit 0 really is spread over several release times at eps = 0.1


def test_bad_input_is_one_line() -> None:
    clean, _, _ = _clean()
    for eps in (-0.01, 0.8):
        with pytest.raises(ConfigError, match=r"epsilon must lie in \[0, ") as exc:
            OptimalSchedule(eps, KEY, ExactHasher()).fit(clean)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"\[0, 0\.75\] \(1 - 1/K for the K = 4"):
        OptimalSchedule(0.8, KEY, ExactHasher()).fit(clean)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        OptimalSchedule(0.1, KEY, ExactHasher(), quantile=1.5)
    with pytest.raises(ConfigError, match="shorter than the 32 bytes"):
        OptimalSchedule(0.1, b"short", ExactHasher())
    with pytest.raises(ConfigError, match="not calibrated"):
        OptimalSchedule(0.1, KEY, ExactHasher()).target_latency_s(np.zeros((1, 2)), np.array([0]), np.ones(4))


def test_exit_never_seen_is_released_like_the_next_deeper_exit() -> None:
    rng = np.random.default_rng(0)
    exits = rng.choice([0, 2], 400)
    lat = (1.0 + 0.5 * exits + rng.normal(0, 0.02, 400)) * 1e-3
    clean = CleanTimes.from_recorded(lat, exits, 3)
    opt = OptimalSchedule(0.2, KEY, ExactHasher()).fit(clean)
    assert opt.used is not None and opt.used.tolist() == [0, 2]
    assert opt.schedule is not None and np.array_equal(opt.schedule[1], opt.schedule[2])
    assert opt.bound is not None and opt.bound <= 0.5 + 0.2 + 1e-7
