"""Binned Gaussian kernel density on a regular grid: linear binning, then one Gaussian filter (O(grid)).

The exit stealers (:mod:`mexit.attacks.stealing`), the defenses' Bayes bound (:mod:`mexit.defense.bayes`) and
the repeated-query bound (:mod:`mexit.attacks.query_bound`) all smooth latency samples this way; one copy here
keeps their grids and kernels identical. scipy's ``gaussian_kde`` evaluates every sample at every grid point
(O(n·grid)), which is too slow for the 10⁵-point grids these need.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def linear_binning(x: np.ndarray, lo: float, step: float, m: int) -> np.ndarray:
    """Counts on the grid ``lo + step * j`` (j < m), each sample split between its two grid neighbours."""
    pos = np.clip((np.asarray(x, dtype=np.float64) - lo) / step, 0, m - 1)
    left = np.minimum(np.floor(pos).astype(np.int64), m - 2) if m > 1 else np.zeros(len(pos), dtype=np.int64)
    frac = pos - left
    counts = np.bincount(left, weights=1 - frac, minlength=m)
    if m > 1:
        counts += np.bincount(left + 1, weights=frac, minlength=m)
    return counts[:m]


def binned_kde(x: np.ndarray, lo: float, step: float, m: int, bandwidth: float) -> np.ndarray:
    """Gaussian-smoothed counts of ``x`` on the grid ``lo + step * j`` (unnormalised: they sum to ~len(x))."""
    return ndimage.gaussian_filter1d(linear_binning(x, lo, step, m), bandwidth / step, mode="constant",
                                     truncate=6.0)
