"""How well *any* exit stealer can do with n queries per sample behind a serving stack's known noise.

Behind a serving stack, a query of a sample leaving at exit ``k`` is answered after ``C + J``: ``C`` the
clean time (the exit's time where the stack adds nothing: the plain server's recording) and ``J`` the stack's
per-request delay, independent of the sample. With ``n`` queries ``t_1..t_n`` the Bayes-optimal stealer for
*balanced* accuracy (equal prior per exit in use) picks ``argmax_k Σ_i log f_k(t_i)``, ``f_k`` the density of
``C_k + J`` (``p_{C,k} ⊛ p_J``). :func:`repeated_query_bound` measures that stealer's balanced accuracy by
simulation: the densities from kernel-smoothed samples on one fine grid (as :mod:`mexit.defense.bayes` does
for one statistic), then fresh ``C`` and ``J`` draws per query, classified by the exact log-likelihood sum.

The bound is *optimistic* for the attacker, which is what a bound should be: the stealer is handed the true
distributions, and each query's clean time is drawn independently from its exit's pool (in reality a
sample's own offset from its exit's mean repeats in every query and does not average out). A goal above it
cannot be met by any stealer at that query count; a measured stealer close to it is near-optimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import signal

from mexit._kde import binned_kde
from mexit.defense.bayes import silverman_bandwidth
from mexit.errors import ConfigError

_MAX_GRID = 400_000
_FLOOR = 1e-12  # density floor per bin (relative): one stray query must not veto an exit outright


def _smoothed_pmf(x: np.ndarray, lo: float, step: float, m: int, bandwidth: float) -> np.ndarray:
    pmf = binned_kde(x, lo, step, m, bandwidth)
    return pmf / max(float(pmf.sum()), 1e-300)


def observed_log_densities(clean: Sequence[np.ndarray], noise: np.ndarray, *, exits: Sequence[int]
                           ) -> tuple[float, float, np.ndarray]:
    """``(lo, step, log_pmf (K, M))``: per exit in ``exits``, the log probability of each grid bin of ``C_k + J``."""
    data = [np.asarray(clean[k], dtype=np.float64).ravel() for k in exits]
    noise = np.asarray(noise, dtype=np.float64).ravel()
    bw = np.array([silverman_bandwidth(c) for c in data])
    bw_noise = silverman_bandwidth(noise)
    step = float(min(bw.min(), bw_noise)) / 4
    n_lo, n_hi = float(np.quantile(noise, 1e-6)), float(noise.max())
    lo = min(float(c.min()) for c in data) - 6 * float(bw.max())
    hi_c = max(float(c.max()) for c in data) + 6 * float(bw.max())
    span_c, span_n = hi_c - lo, n_hi - n_lo + 6 * bw_noise
    m_c, m_n = int(np.ceil(span_c / step)) + 1, int(np.ceil(span_n / step)) + 1
    if m_c + m_n > _MAX_GRID:  # coarser grid rather than a memory blow-up on very wide noise
        step *= (m_c + m_n) / _MAX_GRID
        m_c, m_n = int(np.ceil(span_c / step)) + 1, int(np.ceil(span_n / step)) + 1
    p_noise = _smoothed_pmf(noise, n_lo - 3 * bw_noise, step, m_n, bw_noise)
    out = np.empty((len(data), m_c + m_n - 1))
    for i, (c, h) in enumerate(zip(data, bw, strict=True)):
        conv = np.clip(signal.fftconvolve(_smoothed_pmf(c, lo, step, m_c, h), p_noise), 0.0, None)
        out[i] = np.log(conv / conv.sum() + _FLOOR / conv.size)
    return lo + n_lo - 3 * bw_noise, step, out


def repeated_query_bound(clean: Sequence[np.ndarray], noise: np.ndarray, queries: Sequence[int], *,
                         trials_per_exit: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Balanced accuracy of the Bayes-optimal stealer with ``n`` queries per sample, for each ``n`` in ``queries``.

    ``clean[k]``: clean per-query times of exit ``k`` in seconds (empty for exits no sample took); ``noise``:
    many draws of the stack's per-request delay in seconds. Returns ``{"by_queries": {n: {"balanced_accuracy",
    "per_exit_recall"}}, "exits": [...], "grid_step_s": ...}``; recall is ``None`` for exits not in use.
    """
    use = [k for k in range(len(clean)) if np.size(clean[k])]
    if len(use) < 2:
        raise ConfigError("the query bound needs clean times of at least two exits (one exit is stolen by default)")
    if np.size(noise) < 100:
        raise ConfigError(f"the query bound needs many noise draws (got {np.size(noise)}); pass at least 100")
    if not queries or min(queries) < 1:
        raise ConfigError(f"query counts must be >= 1, got {list(queries)}")
    origin, step, log_pmf = observed_log_densities(clean, noise, exits=use)
    rng = np.random.default_rng(seed)
    noise = np.asarray(noise, dtype=np.float64).ravel()
    out: dict[str, Any] = {"exits": use, "grid_step_s": step, "trials_per_exit": trials_per_exit, "by_queries": {}}
    for n in sorted(set(int(q) for q in queries)):
        recall: list[float | None] = [None] * len(clean)
        for i, k in enumerate(use):
            pool = np.asarray(clean[k], dtype=np.float64).ravel()
            t = rng.choice(pool, (trials_per_exit, n)) + rng.choice(noise, (trials_per_exit, n))
            idx = np.clip(np.rint((t - origin) / step).astype(np.int64), 0, log_pmf.shape[1] - 1)
            score = log_pmf[:, idx].sum(axis=2)  # (exits, trials)
            recall[k] = float(np.mean(np.argmax(score, axis=0) == i))
        used = [r for r in recall if r is not None]
        out["by_queries"][str(n)] = {"balanced_accuracy": float(np.mean(used)), "per_exit_recall": recall}
    return out
