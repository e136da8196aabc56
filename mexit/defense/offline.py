"""Evaluate a delay policy on recorded latencies, without serving again.

An audit records each query's latency once (with repeats) and then sweeps σ: for every σ it needs the
latencies a guarded server *would* have shown. A guarded server releases a response at
``max(compute finished, target)``, so the guarded latency of a recorded one is ``max(recorded, target)``.
Because TimeGuard's delay is deterministic per input, every repeat of one input gets the same target;
this is what makes averaging or taking the minimum over repeats useless to the attacker.

When the recorded latencies are client-side (they include network jitter) this is an approximation:
the jitter would have been added *after* the release, here it competes with the target inside the max.
"""

from __future__ import annotations

import logging

import numpy as np

from mexit.defense.timeguard import DelayPolicy, check_clean_times
from mexit.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


def _as_latency_matrix(latencies_s: np.ndarray) -> tuple[np.ndarray, bool]:
    lat = np.asarray(latencies_s, dtype=np.float64)
    if lat.ndim not in (1, 2) or lat.shape[0] == 0:
        raise InputError(f"latencies_s must have shape (n,) or (n, repeats) with n >= 1, got {lat.shape}")
    if not np.all(np.isfinite(lat)) or np.any(lat < 0):
        raise InputError("latencies_s must be finite and >= 0 (seconds)")
    return (lat[:, None], True) if lat.ndim == 1 else (lat, False)


def _as_exits(exit_index: np.ndarray, n: int) -> np.ndarray:
    exits = np.asarray(exit_index)
    if exits.shape != (n,) or exits.dtype.kind not in "iu" or (n and exits.min() < 0):
        raise InputError(f"exit_index must be {n} non-negative integers (one per sample), got shape {exits.shape} "
                         f"dtype {exits.dtype}")
    return exits.astype(np.int64, copy=False)


def estimate_clean_times(latencies_s: np.ndarray, exit_index: np.ndarray, num_exits: int) -> np.ndarray:
    """Per-exit clean time: the median of all recorded latencies (every repeat) of samples at that exit.

    Exits with no recorded sample get NaN (and a warning): there is nothing to estimate them from.
    """
    lat, _ = _as_latency_matrix(latencies_s)
    exits = _as_exits(exit_index, lat.shape[0])
    if num_exits < 1 or exits.max() >= num_exits:
        raise InputError(f"num_exits={num_exits} but exit_index reaches {exits.max()}")
    times = np.full(num_exits, np.nan)
    for k in range(num_exits):
        sel = lat[exits == k]
        if sel.size:
            times[k] = float(np.median(sel))
    missing = np.flatnonzero(np.isnan(times)).tolist()
    if missing:
        logger.warning("no recorded latency for exit(s) %s; their clean time is unknown (NaN)", missing)
    return times


def apply_offline(policy: DelayPolicy, latencies_s: np.ndarray, exit_index: np.ndarray, inputs: np.ndarray,
                  clean_times_s: np.ndarray | None = None, *, num_exits: int | None = None) -> np.ndarray:
    """Guarded latencies ``max(recorded, target)`` with the same shape as ``latencies_s`` ((n,) or (n, R)).

    ``inputs`` (n, ...) are the queried samples (the policy hashes them); ``clean_times_s`` defaults to
    :func:`estimate_clean_times` over ``num_exits`` exits (default: the highest recorded exit + 1 —
    pass it when the final exit may be absent from the recording, as padding needs its time).
    """
    lat, flat = _as_latency_matrix(latencies_s)
    n = lat.shape[0]
    exits = _as_exits(exit_index, n)
    x = np.asarray(inputs)
    if x.ndim < 1 or x.shape[0] != n:
        raise InputError(f"inputs must hold one sample per latency row: expected {n}, got shape {x.shape}")
    if clean_times_s is None:
        k = int(exits.max()) + 1 if num_exits is None else int(num_exits)
        times = estimate_clean_times(lat, exits, k)
        if np.any(np.isnan(times)):
            raise ConfigError(f"cannot estimate the clean time of exit(s) {np.flatnonzero(np.isnan(times)).tolist()}: "
                              "no recorded sample left there; pass clean_times_s explicitly")
    else:
        times = check_clean_times(clean_times_s)
    target = np.asarray(policy.target_latency_s(x, exits, times), dtype=np.float64).reshape(n)
    guarded = np.maximum(lat, target[:, None])
    return guarded[:, 0] if flat else guarded


def added_latency_summary(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """What the defense costs: mean/median/p99 of latency before and after, absolute and relative.

    ``added_*`` are statistics of the per-value increase ``after - before``; ``relative_*`` compare the
    statistic after with the statistic before (``mean(after) / mean(before) - 1``, ...).
    """
    b = np.asarray(before, dtype=np.float64).ravel()
    a = np.asarray(after, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise InputError(f"before and after must hold the same non-zero number of latencies, got {b.size} and {a.size}")
    added = a - b
    out: dict[str, float] = {}
    for stat, fn in (("mean", np.mean), ("median", np.median), ("p99", lambda v: np.percentile(v, 99))):
        sb, sa = float(fn(b)), float(fn(a))
        out[f"{stat}_before_s"] = sb
        out[f"{stat}_after_s"] = sa
        out[f"{stat}_added_s"] = float(fn(added))
        out[f"relative_{stat}_increase"] = sa / sb - 1.0 if sb > 0 else float("nan")
    return out
