"""Pacing adaptive querying with the attacker's own shadow deployment, and what the shadow's answers measure.

While the target is queried adaptively (:class:`mexit.attacks.collect.Adaptive`), every target query is
followed by one query to the attacker's shadow deployment (:class:`ShadowPacer`). That keeps the host's
traffic mix as it was when shadow and target were recorded together (a server queried back to back answers
faster), and, because the attacker knows which exit each shadow sample takes, the answers are labelled
timings taken *at the same moments* as the target's:

* the host's **drift**: on the 2-core VM behind a jittery stack the median response time wandered by
  ±200 µs over a few seconds (windows of 400 queries), about two thirds of an exit gap, and the target's
  residuals followed the shadow's window by window (``docs/results.md``); one offset estimated once after
  the first rounds cannot follow that;
* the **per-exit centres** on today's clock (``exits``), to blend with the shadow recording's: a fixed
  recording of 200 shadow samples held 1–4 samples of the rare exits, whose centres were off by 100–250 µs.

Which shadow sample the pacer sends matters, because a query's time depends on the query before it (a deep
query after a shallow one finds more of its weights in cache). Sending every exit equally often made the
target's deepest exit answer 0.1–0.34 ms faster than the shadow's; sending the shadow's natural mix while
adaptive querying moves the target's own mix to the rare exits made the target's rare deep exits 0.2–0.35 ms
slower than the paced centres (``docs/results.md``). So the pacer *mirrors the target one query late*: after
target query k it sends a shadow sample of the exit the attacker believes target query k−1 took. Then a
target query and a paced query of the same exit are both preceded by a query whose exit is an independent
draw from the target's current mix — the same conditions — and the exits the target is being asked about
most (the uncertain, often rare ones) get the most paced answers.

:func:`calibrate` estimates both from the answers (alternating: centres from drift-corrected answers, drift
as a running median of the answers' residuals around their centres), and :meth:`PacerCalibration.at` gives
the drift at each target query, so the target's timings are compared with the shadow's on one clock.
:func:`drift_coupling` checks on the target's own repeats that it does move with the shadow's host (a
target on another machine would not, and correcting it would only add the pacer's noise), and by how much: the
target is corrected by the drift times that slope, clipped to [0, 1].
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from mexit.attacks.signals import SignalsError
from mexit.attacks.stealing import exit_medians
from mexit.serve.client import ServerError, ServerUnreachableError

logger = logging.getLogger(__name__)

RETRYABLE = (ServerUnreachableError, ConnectionError, TimeoutError)
#: Paced answers in the running median that measures the drift. Re-analysing two saved Location recordings
#: behind the jittery stack (made before drift correction), the likelihood stealer scored 0.911 / 0.955 / 0.960
#: and 0.823 / 0.832 / 0.810 balanced with windows of 101 / 201 / 401 answers, against 0.877 and 0.228 with the
#: one offset the runs had used (``docs/results.md``); a query's own noise is σ ≈ 0.5 ms there.
DRIFT_WINDOW = 201
#: Answers an exit needs before its paced centre replaces the shadow recording's.
MIN_ANSWERS_PER_EXIT = 10


@dataclass(frozen=True)
class PacerCalibration:
    """The shadow's per-exit centres and the host's drift, measured on the paced answers.

    ``centres`` (num_exits,) ns: the median drift-corrected response time of each exit, NaN for exits with
    fewer than :data:`MIN_ANSWERS_PER_EXIT` answers. ``counts``: answers per exit. ``drift`` (answers,) ns: the
    host's slowdown at each answer, a running median over ``window`` answers of their residuals around their
    exit's centre (its median is 0 by construction: the centres carry the level).
    """

    centres: np.ndarray
    counts: np.ndarray
    drift: np.ndarray
    window: int

    def at(self, answer_index: np.ndarray) -> np.ndarray:
        """The drift at target queries followed by the paced answers ``answer_index`` (-1: none followed, e.g.
        the shadow query failed, or the query was recorded before a resume without its pacer log: 0; an answer
        made after this calibration: its latest drift)."""
        idx = np.asarray(answer_index, dtype=np.int64)
        out = np.zeros(idx.shape, dtype=np.float64)
        if not len(self.drift):
            return out
        ok = idx >= 0
        out[ok] = self.drift[np.minimum(idx[ok], len(self.drift) - 1)]
        return out

    def describe(self) -> dict[str, Any]:
        d = self.drift
        return {"centres_ns": [None if not np.isfinite(c) else round(float(c), 1) for c in self.centres],
                "answers_per_exit": self.counts.astype(int).tolist(), "window": self.window,
                "drift_sd_ns": round(float(np.std(d)), 1) if len(d) else None,
                "drift_range_ns": [round(float(d.min()), 1), round(float(d.max()), 1)] if len(d) else None}


def calibrate(rtt_ns: np.ndarray, exits: np.ndarray, num_exits: int, *, window: int = DRIFT_WINDOW,
              iterations: int = 3) -> PacerCalibration:
    """Per-exit centres and drift from labelled answers in time order (see :class:`PacerCalibration`).

    Alternates three times (it settles after two on the recordings tried): centres = per-exit medians of the
    drift-corrected answers; drift = running median (``window`` answers, edges held) of the residuals around
    those centres.
    """
    t = np.asarray(rtt_ns, dtype=np.float64)
    y = np.asarray(exits, dtype=np.int64)
    if t.shape != y.shape or t.ndim != 1:
        raise SignalsError(f"need one exit per paced answer, got {t.shape} answers and {y.shape} exits")
    counts = np.bincount(y, minlength=num_exits)[:num_exits]
    drift = np.zeros(len(t))
    window = max(1, min(int(window), len(t) | 1))
    for _ in range(iterations):
        centres = exit_medians(t - drift, y, num_exits)
        drift = ndimage.median_filter(t - centres[y], size=window, mode="nearest")
    centres[counts < MIN_ANSWERS_PER_EXIT] = np.nan
    return PacerCalibration(centres=centres, counts=counts, drift=drift, window=window)


class Coupling(NamedTuple):
    """How the target's timings move with the pacer's drift (:func:`drift_coupling`)."""

    slope: float
    se: float
    queries: int

    def moves(self, z: float = 2.0) -> bool:
        """Whether the slope is ``z`` standard errors above 0 (and the drift varies at all)."""
        return bool(np.isfinite(self.slope) and np.isfinite(self.se) and self.slope - z * self.se > 0)

    @property
    def share(self) -> float:
        """The part of the pacer's drift to take off the target: the slope within [0, 1], 0 if it does not move.

        The slope is the least-squares prediction of the target's own excess from the pacer's drift; a target
        that moves with only part of it (slope 0.35 on one plain-server recording, where correcting by all of
        it read 0.842 balanced, by the slope's share 0.962, uncorrected 0.940) is corrected by that part."""
        return float(np.clip(self.slope, 0.0, 1.0)) if self.moves() else 0.0

    def describe(self) -> dict[str, Any]:
        return {"slope": None if not np.isfinite(self.slope) else round(self.slope, 3),
                "se": None if not np.isfinite(self.se) else round(self.se, 3), "queries": self.queries,
                "corrected": self.moves()}


def drift_coupling(latencies: np.ndarray, drift: np.ndarray) -> Coupling:
    """How the target's timings move with the pacer's drift: (slope, its standard error, queries used).

    Within-sample least squares: each sample's repeats less their mean, against the drift at those queries
    less its mean over them, so the sample's exit (its level) drops out. A target on the shadow's host moves
    with it (slope about 1: 1.05 ± 0.12 on a Location recording); one elsewhere does not (about 0).
    """
    t = np.asarray(latencies, dtype=np.float64)
    g = np.asarray(drift, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(g)
    t, g = np.where(ok, t, np.nan), np.where(ok, g, np.nan)
    rows = ok.sum(axis=1) >= 2
    if not rows.any():
        return Coupling(math.nan, math.inf, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = (t[rows] - np.nanmean(t[rows], axis=1, keepdims=True))[ok[rows]]
        d = (g[rows] - np.nanmean(g[rows], axis=1, keepdims=True))[ok[rows]]
    sxx = float(d @ d)
    if not sxx > 0:
        return Coupling(math.nan, math.inf, len(r))
    beta = float(d @ r) / sxx
    dof = max(len(r) - int(rows.sum()) - 1, 1)
    resid = r - beta * d
    return Coupling(beta, math.sqrt(float(resid @ resid) / dof / sxx), len(r))


def moves_with_host(latencies: np.ndarray, drift: np.ndarray, z: float = 2.0) -> bool:
    """Whether the target's timings follow the pacer's drift: the coupling slope is ``z`` standard errors
    above 0 (and the drift varies at all)."""
    return drift_coupling(latencies, drift).moves(z)


def target_drift(latencies: np.ndarray, cal: PacerCalibration, answer_index: np.ndarray
                 ) -> tuple[np.ndarray | None, Coupling]:
    """The drift to take off each target query (NaN where no query was made), or None when the target does
    not move with the pacer's host; and the coupling that decided it. ``answer_index``: the paced answer that
    followed each query (:meth:`PacerCalibration.at`)."""
    lat = np.asarray(latencies, dtype=np.float64)
    drift = np.where(np.isfinite(lat), cal.at(answer_index), np.nan)
    coupling = drift_coupling(lat, drift)
    return (drift * coupling.share if coupling.moves() else None), coupling


class ShadowPacer:
    """After a target query, one query to the shadow deployment (with probability ``share``, default always).

    The attacker owns the shadow, so these queries cost it nothing. A failed query is counted, never raised:
    pacing must not stop the target's collection. ``share=0.5`` would reproduce the random schedule of
    :func:`mexit.attacks.collect.collect_interleaved` more literally, but on the jittery Location stack it
    stole worse in both recordings tried (0.59 and 0.73 balanced at budget 20, against 0.90–0.98 with
    ``share=1``; ``docs/results.md``), so every target query is paced by default.

    ``exits``: the shadow's true exit for each row of ``x`` (the attacker ran its own model); with it,
    :meth:`calibration` measures the drift and the per-exit centres on the answers, without it the pacer only
    paces. Which row is sent: called with ``exit_hint`` (the exit the attacker believes the *previous* target
    query took; :class:`~mexit.attacks.collect.Adaptive` passes it), the next row of that exit, so the pacer
    mirrors the target's traffic one query late (see the module docstring); without a hint, or for an exit
    the shadow never takes, the next row of a seeded random cycle over all rows (the shadow's natural mix).
    """

    def __init__(self, client: Any, x: np.ndarray, *, seed: int = 0, share: float = 1.0,
                 exits: np.ndarray | None = None, num_exits: int | None = None) -> None:
        if not len(x):
            raise SignalsError("a shadow pacer needs at least one shadow sample to send")
        if not 0 < share <= 1:
            raise SignalsError(f"the pacing share must lie in (0, 1], got {share}")
        if exits is not None and len(exits) != len(x):
            raise SignalsError(f"the pacer got {len(exits)} shadow exits for {len(x)} samples")
        self.client, self.x, self.share = client, x, float(share)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
        self.exits = None if exits is None else np.asarray(exits, dtype=np.int64)
        self.num_exits = int(num_exits if num_exits is not None else (0 if exits is None else self.exits.max() + 1))
        self._order = rng.permutation(len(x))
        self._by_exit = {} if self.exits is None else {
            int(k): rng.permutation(np.flatnonzero(self.exits == k)) for k in np.unique(self.exits)}
        self._turns: dict[int | None, int] = {}
        self._coin = rng
        self.sent = 0
        self.failed = 0
        self.last = -1  # index of the answer to the latest call, -1 when it failed or was skipped
        self._rows: list[int] = []
        self._rtt: list[int] = []

    @property
    def calibrates(self) -> bool:
        """Whether the answers are labelled with exits, so :meth:`calibration` can measure drift and centres."""
        return self.exits is not None

    def _row(self, exit_hint: int | None) -> int:
        cycle = self._by_exit.get(exit_hint) if exit_hint is not None else None
        key = exit_hint if cycle is not None else None
        cycle = cycle if cycle is not None else self._order
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        return int(cycle[turn % len(cycle)])

    def __call__(self, exit_hint: int | None = None) -> None:
        self.last = -1
        if self.share < 1 and self._coin.random() >= self.share:
            return
        i = self._row(exit_hint)
        self.sent += 1
        try:
            res = self.client.infer(self.x[i : i + 1])
        except (ServerError, *RETRYABLE) as exc:
            self.failed += 1
            logger.debug("pacing query to the shadow failed: %s", exc)
            return
        rtt = getattr(res, "rtt_ns", None)
        if rtt is not None:
            self.last = len(self._rows)
            self._rows.append(i)
            self._rtt.append(int(rtt))

    @property
    def answers(self) -> tuple[np.ndarray, np.ndarray]:
        """(shadow row, round-trip ns) of every answered pacing query, in the order sent."""
        return np.asarray(self._rows, dtype=np.int64), np.asarray(self._rtt, dtype=np.int64)

    def restore(self, rows: np.ndarray, rtt_ns: np.ndarray) -> None:
        """Continue after a resumed collection: the answers recorded before it was interrupted."""
        self._rows, self._rtt = [int(r) for r in rows], [int(t) for t in rtt_ns]
        self.sent = max(self.sent, len(self._rows))

    def calibration(self, window: int = DRIFT_WINDOW) -> PacerCalibration | None:
        """Drift and per-exit centres on the answers so far (:func:`calibrate`); None without exits, or until
        ``window`` answers and two exits with :data:`MIN_ANSWERS_PER_EXIT` answers each are in."""
        if self.exits is None or len(self._rows) < window:
            return None
        rows, rtt = self.answers
        cal = calibrate(rtt, self.exits[rows], self.num_exits, window=window)
        return cal if np.isfinite(cal.centres).sum() >= 2 else None

    def report(self, calibration: PacerCalibration | None = None) -> dict[str, Any]:
        """Queries sent, failed and answered, and the calibration (``calibration``, else computed now)."""
        out: dict[str, Any] = {"sent": self.sent, "failed": self.failed, "answered": len(self._rows)}
        cal = calibration if calibration is not None else self.calibration()
        if cal is not None:
            out["calibration"] = cal.describe()
        return out
