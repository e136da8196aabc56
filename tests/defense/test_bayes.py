"""The exact Bayes bound: limits, monotonicity in σ, and agreement with the oracle on held-out traffic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mexit.attacks.oracle import OracleStealer
from mexit.defense import CleanTimes, ExactHasher, OptimalSchedule, QuantilePadding, TimeGuard, apply_offline
from mexit.defense import bayes_balanced_accuracy as bayes
from mexit.errors import ConfigError

KEY = bytes(range(32))


def _traffic(seed: int, n: int, gap_ms: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three exits, equal shares, Gaussian per-sample clean times with 5 noisy repeats each."""
    rng = np.random.default_rng(seed)
    exits = rng.integers(0, 3, n)
    base = 1.0 + gap_ms * exits + rng.normal(0, 0.1, n)
    lat = (base[:, None] + rng.normal(0, 0.02, (n, 5))) * 1e-3
    return lat, exits, rng.random((n, 8)).astype(np.float32)


def test_bound_limits() -> None:
    far = [np.full(50, 1e-3) + np.linspace(0, 1e-5, 50), np.full(50, 5e-3) + np.linspace(0, 1e-5, 50)]
    assert bayes(far) == pytest.approx(1.0, abs=1e-6)  # separable without a defense
    same = [np.linspace(1e-3, 2e-3, 50)] * 3
    assert bayes(same) == pytest.approx(1 / 3, abs=1e-6)  # identical distributions: chance
    pad = QuantilePadding(1.0, margin_s=1e-3).fit(CleanTimes.from_samples(far))  # clear of the kernel tail
    assert bayes(far, lambda k, g: pad.release_cdf(k, g)) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError, match="no clean-time samples"):
        bayes([np.ones(3), np.array([])], exits=[0, 1])


def test_bound_falls_with_sigma() -> None:
    lat, exits, _ = _traffic(0, 600)
    clean = [lat[exits == k].mean(axis=1) for k in range(3)]
    med = np.array([np.median(c) for c in clean])
    values = [bayes(clean, lambda k, g, s=s: TimeGuard(s, KEY, ExactHasher()).release_cdf(k, g, med))
              for s in (1e-5, 2e-4, 1e-3, 5e-3)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] < 0.45


@pytest.mark.parametrize("policy", ["none", "timeguard", "optimal"])
def test_oracle_reaches_the_bound_on_held_out_traffic(policy: str) -> None:
    """Calibrate on one recording, judge fresh traffic: the oracle lands within 0.03 of the Bayes bound."""
    cal_lat, cal_exits, _ = _traffic(1, 1500)
    clean = CleanTimes.from_recorded(cal_lat, cal_exits, 3)
    med = clean.medians()
    pol = {"none": None, "timeguard": TimeGuard(4e-4, KEY, ExactHasher()),
           "optimal": OptimalSchedule(0.15, KEY, ExactHasher()).fit(clean)}[policy]
    per_sample = [cal_lat[cal_exits == k].mean(axis=1) for k in range(3)]
    bound = bayes(per_sample) if pol is None else bayes(per_sample, lambda k, g: pol.release_cdf(k, g, med))
    (tr_lat, tr_ex, tr_x), (te_lat, te_ex, te_x) = _traffic(2, 1500), _traffic(3, 1500)
    if pol is not None:
        tr_lat = apply_offline(pol, tr_lat, tr_ex, tr_x, med)
        te_lat = apply_offline(pol, te_lat, te_ex, te_x, med)
    measured = OracleStealer(seed=0).fit_score(tr_lat, tr_ex, te_lat, te_ex)
    assert measured == pytest.approx(bound, abs=0.03), (policy, measured, bound)
