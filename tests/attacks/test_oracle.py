"""The oracle stealer: an upper bound that sees separable exits, is balanced under skew, and falls to chance."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.attacks.oracle import LABEL, OracleStealer, oracle_features, quantise
from mexit.errors import InputError


def _timings(seed: int, n: int, gap_ms: float, shares: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    exits = rng.choice(len(shares), n, p=shares)
    lat = (1.0 + gap_ms * exits[:, None] + rng.normal(0, 0.05, (n, 5))) * 1e-3
    return lat, exits


def test_features_are_robust_summaries_of_the_repeats() -> None:
    lat = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]])
    f = oracle_features(lat)[0]
    assert f[0] == 1.0 and f[1] == 3.0 and f[2] == pytest.approx(3.0) and f[3] == 2.0 and f[4] == 4.0
    assert oracle_features(np.array([1.0, 2.0])).shape == (2, 5)
    with pytest.raises(InputError, match="finite"):
        oracle_features(np.array([[np.nan]]))
    q = quantise(np.arange(1000.0)[:, None], levels=16)
    assert np.unique(q).size == 16 and np.all(np.diff(q[:, 0]) >= 0)


def test_separable_exits_are_found_even_when_rare() -> None:
    lat, exits = _timings(0, 400, 0.5, (0.8, 0.05, 0.15))
    oracle = OracleStealer(folds=3, seed=0)
    assert oracle.balanced_accuracy(lat, exits) >= 0.95  # balanced: the 5 % exit counts as much as the 80 % one
    assert "upper bound" in LABEL and OracleStealer.label == LABEL


def test_no_timing_signal_gives_chance() -> None:
    rng = np.random.default_rng(1)
    lat, _ = _timings(1, 600, 0.0, (0.5, 0.5))
    exits = rng.integers(0, 2, 600)
    assert OracleStealer(folds=3, seed=0).balanced_accuracy(lat, exits) == pytest.approx(0.5, abs=0.07)


def test_single_exit_and_bad_input() -> None:
    lat, _ = _timings(2, 50, 0.5, (1.0,))
    assert np.array_equal(OracleStealer().cross_val_predict(lat, np.zeros(50, dtype=np.int64)), np.zeros(50))
    with pytest.raises(InputError, match="one exit per sample"):
        OracleStealer().cross_val_predict(lat, np.zeros(3))
    with pytest.raises(InputError, match="at least 2"):
        OracleStealer(folds=1)


def test_held_out_score() -> None:
    tr, te = _timings(3, 300, 0.5, (0.5, 0.5)), _timings(4, 300, 0.5, (0.5, 0.5))
    assert OracleStealer(seed=0).fit_score(tr[0], tr[1], te[0], te[1]) >= 0.97
