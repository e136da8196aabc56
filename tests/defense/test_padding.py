"""Padding that does not leak: release at a high quantile, never before it; overruns leave at completion."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.defense import CleanTimes, QuantilePadding, apply_offline
from mexit.errors import ConfigError


def _recording(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    exits = rng.choice(3, n, p=[0.2, 0.2, 0.6])
    lat = (1.0 + exits[:, None] + rng.gamma(2.0, 0.05, (n, 5))) * 1e-3
    return lat, exits


def test_release_is_at_least_the_calibrated_quantile_of_every_exit() -> None:
    lat, exits = _recording()
    clean = CleanTimes.from_recorded(lat, exits, 3)
    for q in (0.5, 0.99, 0.999, 1.0):
        pad = QuantilePadding(q, margin_s=1e-4).fit(clean)
        assert pad.release_s is not None and pad.release_s >= clean.quantiles(q).max() + 1e-4 - 1e-12
        targets = pad.target_latency_s(np.zeros((len(exits), 2)), exits, clean.medians())
        assert np.all(targets == pad.release_s)
    # At p99.9 almost nothing overruns, so the released time carries no exit information; at the median
    # (the old ConstantTimePadding) half of the final exit's answers overrun and show through.
    x = np.zeros((len(exits), 2))
    high = apply_offline(QuantilePadding(0.999).fit(clean), lat, exits, x, clean.medians())
    low = apply_offline(QuantilePadding(0.5).fit(clean), lat, exits, x, clean.medians())
    assert np.mean(high == lat) <= 0.002 < 0.2 <= np.mean(low == lat)


def test_release_cdf_is_a_step_at_the_release() -> None:
    pad = QuantilePadding(1.0).fit(CleanTimes.from_samples([[1e-3], [2e-3]]))
    assert pad.release_cdf(0, np.array([1e-3, 2e-3 - 1e-9, 2e-3, 3e-3])).tolist() == [0, 0, 1, 1]


def test_bad_padding_parameters_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        QuantilePadding(0.0)
    with pytest.raises(ConfigError, match="margin"):
        QuantilePadding(0.9, margin_s=-1.0)
    with pytest.raises(ConfigError, match="not calibrated"):
        QuantilePadding().target_latency_s(np.zeros((1, 2)), np.array([0]), np.array([1e-3]))
