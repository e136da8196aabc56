"""Offline evaluation on recorded latencies, including the privacy effect on a latency-based exit stealer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.tree import DecisionTreeClassifier

from mexit.defense import (
    ConstantTimePadding,
    ExactHasher,
    TimeGuard,
    added_latency_summary,
    apply_offline,
    estimate_clean_times,
)
from mexit.errors import ConfigError, InputError
from tests.defense._fakes import EXIT_TIMES_S, inputs_for_exits

KEY = bytes(range(32))
GAP_S = 0.002  # adjacent exits of EXIT_TIMES_S are 2 ms apart


def _recording(n: int = 1500, repeats: int = 5, jitter_s: float = 0.0001, seed: int = 0):
    """Synthetic recorded latencies: per-exit clean time plus small positive jitter on every repeat."""
    rng = np.random.default_rng(seed)
    exits = rng.integers(0, len(EXIT_TIMES_S), n)
    x = inputs_for_exits(exits, seed=seed)
    lat = np.asarray(EXIT_TIMES_S)[exits][:, None] + np.abs(rng.normal(0, jitter_s, (n, repeats)))
    return x, exits, lat


def _exit_stealing_accuracy(latency_s: np.ndarray, exits: np.ndarray) -> float:
    """An attacker who knows the exits of shadow samples learns exit <- latency (min over repeats)."""
    feature = latency_s.min(axis=1, keepdims=True) if latency_s.ndim == 2 else latency_s[:, None]
    clf = DecisionTreeClassifier(max_depth=4, random_state=0)
    return float(cross_val_score(clf, feature, exits, cv=3, scoring="accuracy").mean())


def test_estimate_clean_times_is_median_per_exit(caplog) -> None:
    lat = np.array([[1.0, 3.0], [2.0, 2.0], [10.0, 12.0], [11.0, 30.0]])
    exits = np.array([0, 0, 2, 2])
    with caplog.at_level(logging.WARNING):
        times = estimate_clean_times(lat, exits, 3)
    assert times[0] == 2.0 and times[2] == 11.5 and np.isnan(times[1])
    assert "exit(s) [1]" in caplog.text
    assert np.array_equal(estimate_clean_times(lat[:, 0], exits, 3)[[0, 2]], [1.5, 10.5])
    with pytest.raises(InputError, match="num_exits=2"):
        estimate_clean_times(lat, exits, 2)


def test_repeats_share_the_delay_and_latencies_never_drop() -> None:
    x, exits, lat = _recording(n=300, repeats=4)
    guard = TimeGuard(0.01, KEY, ExactHasher())
    out = apply_offline(guard, lat, exits, x, clean_times_s=EXIT_TIMES_S)
    assert out.shape == lat.shape
    assert np.all(out >= lat)
    target = np.asarray(EXIT_TIMES_S)[exits] + guard.delays_s(x)
    assert np.array_equal(out, np.maximum(lat, target[:, None]))
    covered = target > lat.max(axis=1)  # the delay outlasted every repeat's jitter
    assert covered.mean() > 0.9
    assert np.all(out[covered] == out[covered][:, :1])  # all repeats of one input identical
    flat = apply_offline(guard, lat[:, 0], exits, x, clean_times_s=EXIT_TIMES_S)
    assert flat.shape == (300,) and np.array_equal(flat, out[:, 0])


def test_clean_times_default_to_the_recording_and_padding_needs_the_final_exit() -> None:
    x, exits, lat = _recording(n=300)
    guard = TimeGuard(0.01, KEY, ExactHasher())
    estimated = estimate_clean_times(lat, exits, 3)
    assert np.array_equal(apply_offline(guard, lat, exits, x), apply_offline(guard, lat, exits, x, estimated))
    early = exits < 2
    with pytest.raises(ConfigError, match="no recorded sample"):
        apply_offline(ConstantTimePadding(), lat[early], exits[early], x[early], num_exits=3)
    with pytest.raises(InputError, match="one sample per latency row"):
        apply_offline(guard, lat, exits, x[:10])


def test_padding_hides_early_exits_behind_the_final_time() -> None:
    x, exits, lat = _recording(n=300)
    out = apply_offline(ConstantTimePadding(), lat, exits, x, clean_times_s=EXIT_TIMES_S)
    assert np.all(out >= EXIT_TIMES_S[-1]) and np.all(out >= lat)
    assert np.all(out[exits < 2] == EXIT_TIMES_S[-1])


def test_timeguard_defeats_latency_exit_stealing_offline() -> None:
    x, exits, lat = _recording(n=1500, repeats=5)
    chance = np.bincount(exits).max() / len(exits)
    assert _exit_stealing_accuracy(lat, exits) > 0.95  # unguarded: the exit is plain to see

    sigma = 10 * GAP_S
    guarded = apply_offline(TimeGuard(sigma, KEY, ExactHasher()), lat, exits, x, clean_times_s=EXIT_TIMES_S)
    # Bayes-optimal accuracy here is ~0.39 (only the left edge of each shifted half-normal is
    # unambiguous) against a chance level of ~0.33; the unguarded attack was ~1.0.
    assert _exit_stealing_accuracy(guarded, exits) < chance + 0.12

    # The point of determinism: a fresh random delay per query is removed by taking the minimum.
    rng = np.random.default_rng(1)
    many = np.repeat(lat[:, :1], 50, axis=1)
    fresh = many + np.abs(rng.normal(0, sigma, many.shape))
    assert _exit_stealing_accuracy(fresh, exits) > 0.8
    same = apply_offline(TimeGuard(sigma, KEY, ExactHasher()), many, exits, x, clean_times_s=EXIT_TIMES_S)
    assert _exit_stealing_accuracy(same, exits) < chance + 0.12


def test_added_latency_summary() -> None:
    before = np.array([1.0, 1.0, 2.0, 4.0])
    after = np.array([2.0, 1.0, 3.0, 6.0])
    s = added_latency_summary(before, after)
    assert s["mean_before_s"] == 2.0 and s["mean_after_s"] == 3.0
    assert s["mean_added_s"] == 1.0 and s["relative_mean_increase"] == pytest.approx(0.5)
    assert s["median_added_s"] == 1.0 and s["relative_median_increase"] == pytest.approx(2.5 / 1.5 - 1)
    assert s["p99_added_s"] == pytest.approx(np.percentile([1.0, 0.0, 1.0, 2.0], 99))
    with pytest.raises(InputError):
        added_latency_summary(before, after[:2])
