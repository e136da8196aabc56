"""The repeated-query Bayes bound against a case with a closed form, and its refusals."""

import numpy as np
import pytest
from scipy.stats import norm

from mexit.attacks.query_bound import repeated_query_bound
from mexit.errors import ConfigError


def test_bound_matches_the_gaussian_closed_form():
    """Two exits 1 ms apart, clean times nearly exact, Gaussian noise of sd 1 ms: with n queries the optimal
    stealer compares the mean with the midpoint, so its balanced accuracy is Φ(0.5 ms · √n / 1 ms)."""
    rng = np.random.default_rng(0)
    clean = [2e-3 + rng.normal(0, 1e-6, 500), 3e-3 + rng.normal(0, 1e-6, 500)]
    noise = 5e-3 + rng.normal(0, 1e-3, 200_000)
    res = repeated_query_bound(clean, noise, [1, 4, 16], trials_per_exit=4000, seed=1)
    for n in (1, 4, 16):
        expect = norm.cdf(0.5 * np.sqrt(n))
        assert res["by_queries"][str(n)]["balanced_accuracy"] == pytest.approx(expect, abs=0.02)
    accs = [res["by_queries"][str(n)]["balanced_accuracy"] for n in (1, 4, 16)]
    assert accs == sorted(accs)  # more queries never hurt the optimal stealer


def test_unused_exits_have_no_recall_and_noise_free_exits_are_perfect():
    rng = np.random.default_rng(2)
    clean = [1e-3 + rng.normal(0, 1e-6, 300), np.array([]), 5e-3 + rng.normal(0, 1e-6, 300)]
    res = repeated_query_bound(clean, rng.normal(0, 1e-5, 10_000), [2], trials_per_exit=500)
    row = res["by_queries"]["2"]
    assert row["per_exit_recall"][1] is None and row["balanced_accuracy"] == 1.0 and res["exits"] == [0, 2]


def test_bad_input_is_refused():
    one = [np.full(10, 1e-3)]
    with pytest.raises(ConfigError, match="at least two exits"):
        repeated_query_bound(one, np.zeros(1000), [1])
    two = [np.full(10, 1e-3), np.full(10, 2e-3)]
    with pytest.raises(ConfigError, match="many noise draws"):
        repeated_query_bound(two, np.zeros(5), [1])
    with pytest.raises(ConfigError, match=">= 1"):
        repeated_query_bound(two, np.zeros(1000), [0])
