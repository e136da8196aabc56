"""The exact Bayes bound: the best balanced exit-stealing accuracy any stealer can reach against a policy.

A guarded response leaves at ``max(C, R)``: ``C`` the sample's clean compute time (its per-sample value
after the attacker reduces its repeated queries, jitter included) and ``R`` the policy's release time,
drawn once per input from the keyed uniform (so repeats do not average it away). For exit ``k`` the
observed time's CDF is ``F_C,k(t) · F_R,k(t)`` (independent: the key is independent of the compute
jitter). The Bayes-optimal stealer for *balanced* accuracy (equal weight per exit in use) picks, at each
observed time, the exit with the largest class-conditional density, so its balanced accuracy is
``(1/K) Σ_bins max_k P_k(bin)`` on a time grid fine against the distributions' widths.

``F_C,k`` is a Gaussian kernel smoothing of the calibration samples (Silverman's bandwidth per exit):
the raw empirical CDF on a fine grid would separate any two finite samples perfectly and report a
bound of 1. No stealer does better than this on fresh traffic from the same distributions, up to the
smoothing and the sampling error of the calibration itself; the oracle stealer
(:mod:`mexit.attacks.oracle`) measures the same quantity from below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mexit._kde import binned_kde
from mexit.errors import ConfigError

ReleaseCDF = Callable[[int, np.ndarray], np.ndarray]
_MAX_GRID = 100_000
_TAIL = 1e-9


def silverman_bandwidth(x: np.ndarray) -> float:
    """Silverman's rule of thumb, ``0.9 · min(sd, IQR/1.34) · n^(-1/5)``; a tiny positive floor for constant data."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size < 2:
        return max(abs(float(x[0])) * 1e-3, 1e-7) if x.size else 1e-7
    iqr = float(np.subtract(*np.percentile(x, [75, 25])))
    spread = min(float(np.std(x, ddof=1)), iqr / 1.34) or float(np.std(x, ddof=1))
    h = 0.9 * spread * x.size ** (-0.2)
    return h if h > 0 else max(abs(float(np.median(x))) * 1e-3, 1e-7)


def no_release(exit_k: int, grid_s: np.ndarray) -> np.ndarray:
    """The release CDF of no defense: released as soon as computed (``R = 0``)."""
    return np.ones_like(np.asarray(grid_s, dtype=np.float64))


def observed_pmfs(clean: Sequence[np.ndarray], release_cdf: ReleaseCDF, *,
                  exits: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-exit probability of the observed (released) time per grid bin: ``(grid, pmf (K, M+1), exits)``.

    ``clean[k]`` holds the per-sample clean times of exit ``k`` (seconds); ``exits`` the exits to include
    (default: those with samples). The last column is the mass beyond the grid (the release tail).
    """
    use = [k for k in range(len(clean)) if np.size(clean[k])] if exits is None else [int(k) for k in exits]
    if not use:
        raise ConfigError("the Bayes bound needs clean-time samples of at least one exit")
    for k in use:
        if not np.size(clean[k]):
            raise ConfigError(f"exit {k} is asked for in the Bayes bound but has no clean-time samples")
    data = [np.asarray(clean[k], dtype=np.float64).ravel() for k in use]
    bw = np.array([silverman_bandwidth(c) for c in data])
    lo = min(float(c.min()) for c in data) - 6 * float(bw.max())
    hi = max(float(c.max()) for c in data) + 6 * float(bw.max())
    step = float(bw.min()) / 8
    # Extend the horizon until every exit's release has (almost) all its mass inside.
    span = hi - lo
    for _ in range(30):
        edge = np.array([hi])
        if all(float(release_cdf(k, edge)[0]) >= 1 - _TAIL for k in use):
            break
        hi += span
        span *= 2
    m = int(np.ceil((hi - lo) / step)) + 1
    if m > _MAX_GRID:
        m = _MAX_GRID
    grid = np.linspace(lo, hi, m)
    step_g = float(grid[1] - grid[0])
    pmf = np.empty((len(use), m + 1))
    for i, (k, c, h) in enumerate(zip(use, data, bw, strict=True)):
        # Kernel CDF of the clean time: linear binning onto the grid, a Gaussian filter, a cumulative sum (O(M)).
        f_c = np.cumsum(binned_kde(c, lo, step_g, m, h))
        f_c /= max(f_c[-1], 1e-300)
        f_obs = np.clip(f_c * np.asarray(release_cdf(k, grid), dtype=np.float64), 0.0, 1.0)
        f_obs = np.maximum.accumulate(f_obs)
        pmf[i, :m] = np.diff(f_obs, prepend=0.0)
        pmf[i, m] = max(1.0 - f_obs[-1], 0.0)
    return grid, pmf, use


def bayes_balanced_accuracy(clean: Sequence[np.ndarray], release_cdf: ReleaseCDF = no_release, *,
                            exits: Sequence[int] | None = None) -> float:
    """The Bayes-optimal stealer's balanced accuracy over the exits in use (``≥ 1/K``, ``≤ 1``)."""
    _, pmf, use = observed_pmfs(clean, release_cdf, exits=exits)
    return float(pmf.max(axis=0).sum() / len(use))


def schedule_bound(q: np.ndarray) -> float:
    """Bayes balanced accuracy of a discrete release schedule ``q (K, M)`` (rows: exits in use) when every
    release exceeds the compute time: ``(1/K) Σ_j max_k q_kj``."""
    q = np.asarray(q, dtype=np.float64)
    return float(q.max(axis=0).sum() / q.shape[0])


REPEAT_STATISTICS = {"min": 0.0, "q25": 0.25, "median": 0.5, "q75": 0.75, "max": 1.0}


def repeat_statistics_bound(latencies_s: np.ndarray, exits: np.ndarray, release_cdf: ReleaseCDF = no_release
                            ) -> tuple[float, dict[str, float]]:
    """The Bayes bound for a stealer that sees repeated queries, through each order statistic of the repeats.

    A release ``R`` fixed per input commutes with every order statistic of the repeats:
    ``stat_r max(C_r, R) = max(stat_r C_r, R)``. So for each statistic (min, quartiles, max) the bound of
    :func:`bayes_balanced_accuracy` on that statistic's clean distribution is exact for a stealer using it:
    the minimum sees a release close to the clean time (small-σ TimeGuard), the maximum sees the overruns
    of padding's tail. Returns the largest (a lower bound on the full-vector Bayes bound, and the one every
    single-statistic stealer is held to) and each statistic's value.
    """
    lat = np.asarray(latencies_s, dtype=np.float64)
    lat = lat[:, None] if lat.ndim == 1 else lat
    ex = np.asarray(exits, dtype=np.int64)
    used = np.unique(ex).tolist()
    per: dict[str, float] = {}
    for name, q in REPEAT_STATISTICS.items():
        stat = np.quantile(lat, q, axis=1, method="inverted_cdf") if 0 < q < 1 else (
            lat.min(axis=1) if q == 0 else lat.max(axis=1))
        by_exit = [stat[ex == k] for k in range(int(ex.max()) + 1)]
        per[name] = bayes_balanced_accuracy(by_exit, release_cdf, exits=used)
    return max(per.values()), per
