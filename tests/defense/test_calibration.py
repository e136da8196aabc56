"""Clean-time distributions: quantiles per exit, exit shares, and what an exit nobody took borrows."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mexit.defense import CleanTimes
from mexit.defense.calibration import check_quantile
from mexit.errors import ConfigError


def test_from_recorded_keeps_every_repeat_and_the_shares() -> None:
    lat = np.array([[1.0, 1.2], [2.0, 2.4], [2.2, 2.6], [3.0, 3.0]]) * 1e-3
    clean = CleanTimes.from_recorded(lat, np.array([0, 1, 1, 2]), 3)
    assert [a.size for a in clean.samples] == [2, 4, 2]
    assert clean.counts.tolist() == [1, 2, 1] and np.allclose(clean.shares, [0.25, 0.5, 0.25])
    assert np.allclose(clean.quantiles(1.0), [1.2e-3, 2.6e-3, 3.0e-3])
    assert np.allclose(clean.medians(), [1.1e-3, 2.3e-3, 3.0e-3])


def test_unseen_exit_borrows_the_next_deeper_seen_exit(caplog: pytest.LogCaptureFixture) -> None:
    clean = CleanTimes.from_samples([[1e-3], [], [3e-3], []])
    with caplog.at_level(logging.WARNING):
        q = clean.quantiles(0.5)
    assert q.tolist() == [1e-3, 3e-3, 3e-3, 3e-3]  # exit 1 -> exit 2; exit 3 (past the last seen) -> slowest
    assert "exit(s) [1, 3]" in caplog.text
    assert clean.filled().counts.tolist() == [1, 0, 1, 0]  # shares are what calibration saw


def test_bad_calibration_is_one_line() -> None:
    with pytest.raises(ConfigError, match="no exit at all"):
        CleanTimes.from_samples([[], []])
    with pytest.raises(ConfigError, match="finite"):
        CleanTimes.from_samples([[np.nan]])
    with pytest.raises(ConfigError, match=r"exits must lie in \[0, 1\]"):
        CleanTimes.from_recorded(np.ones((2, 3)), np.array([0, 2]), 2)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\(0, 1\]") as exc:
            check_quantile(bad)
        assert "\n" not in str(exc.value)
