"""Per-exit clean-time *distributions*: what padding and the optimal schedule are calibrated on.

A single median per exit is not enough: padding released at the final exit's median shows every slower
final-exit response through (issue 12: the oracle stealer reached 0.91 against a chance of 0.79), and
the optimal schedule needs each exit's high quantile. :class:`CleanTimes` keeps every calibration
measurement per exit (jitter included) so that policies read quantiles, and the Bayes bound
(:mod:`mexit.defense.bayes`) reads whole distributions.

An exit that no calibration sample took has no measurement. What a policy does for it is decided here,
once, by :meth:`CleanTimes.filled`: it borrows the samples of the next *deeper* exit that was seen (a
deeper exit runs more of the network, so this over-estimates and errs towards more delay), or of the
slowest seen exit when no deeper one was seen. When no exit at all was seen there is nothing to borrow
and calibration fails with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mexit.errors import ConfigError

logger = logging.getLogger(__name__)


def check_quantile(quantile: float, what: str = "quantile") -> float:
    """``quantile`` as a float in (0, 1], or a one-line ConfigError."""
    q = float(quantile)
    if not (0.0 < q <= 1.0):
        raise ConfigError(f"{what} must lie in (0, 1] (e.g. 0.999 for p99.9), got {quantile!r}")
    return q


@dataclass(frozen=True)
class CleanTimes:
    """Calibration measurements (seconds) per exit; ``samples[k]`` may be empty for an exit nobody took.

    ``counts`` are the number of *inputs* that took each exit (the exit shares π_k); they default to
    the number of measurements, which is the same thing when every input was measured equally often.
    """

    samples: tuple[np.ndarray, ...]
    counts: np.ndarray
    _filled: list[CleanTimes] = field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples: Sequence[Sequence[float] | np.ndarray],
                     counts: Sequence[int] | np.ndarray | None = None) -> CleanTimes:
        """Checked construction from per-exit lists of times in seconds."""
        arrs = tuple(np.asarray(s, dtype=np.float64).ravel() for s in samples)
        if not arrs:
            raise ConfigError("clean-time calibration needs at least one exit")
        for k, a in enumerate(arrs):
            if a.size and (not np.all(np.isfinite(a)) or np.any(a < 0)):
                raise ConfigError(f"calibration times of exit {k} must be finite and >= 0 seconds")
        c = np.array([a.size for a in arrs], dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
        if c.shape != (len(arrs),) or np.any(c < 0):
            raise ConfigError(f"counts must hold one non-negative count per exit ({len(arrs)}), got {c.tolist()}")
        if not any(a.size for a in arrs):
            raise ConfigError("calibration saw no exit at all (no timings); pass non-empty calibration inputs "
                              "or recorded latencies")
        return cls(arrs, c)

    @classmethod
    def from_recorded(cls, latencies_s: np.ndarray, exits: np.ndarray, num_exits: int, *,
                      reduce: Literal["all", "min"] = "all") -> CleanTimes:
        """From recorded latencies ``(n,)`` or ``(n, repeats)`` and the exit of each sample.

        ``reduce="all"`` keeps every repeat (server-side compute times); ``"min"`` keeps each sample's
        fastest repeat, the closest a *client-side* recording gets to the compute time — its network and
        client noise would be added after a live guard's release, so it must not inflate the quantiles.
        """
        lat = np.asarray(latencies_s, dtype=np.float64)
        lat = lat[:, None] if lat.ndim == 1 else lat
        if reduce == "min":
            lat = lat.min(axis=1, keepdims=True)
        elif reduce != "all":
            raise ConfigError(f"reduce must be 'all' or 'min', got {reduce!r}")
        ex = np.asarray(exits, dtype=np.int64)
        if lat.ndim != 2 or ex.shape != (lat.shape[0],):
            raise ConfigError(f"latencies {lat.shape} and exits {ex.shape} must have one row per sample")
        if ex.size and (ex.min() < 0 or ex.max() >= num_exits):
            raise ConfigError(f"exits must lie in [0, {num_exits - 1}], got range [{ex.min()}, {ex.max()}]")
        return cls.from_samples([lat[ex == k].ravel() for k in range(num_exits)],
                                np.bincount(ex, minlength=num_exits))

    @property
    def num_exits(self) -> int:
        return len(self.samples)

    @property
    def seen(self) -> np.ndarray:
        """Boolean mask of the exits with at least one measurement."""
        return np.array([a.size > 0 for a in self.samples])

    @property
    def shares(self) -> np.ndarray:
        """Exit shares π_k (sum 1) from the counts."""
        return self.counts / max(int(self.counts.sum()), 1)

    def filled(self) -> CleanTimes:
        """Every exit with samples: an unseen exit borrows the next deeper seen exit's, else the slowest seen.

        Counts are kept (an unseen exit keeps share 0), so the schedule plans for the traffic it saw and
        still has a defined, conservative release for an input that takes an exit calibration never saw.
        """
        seen = np.flatnonzero(self.seen)
        if seen.size == self.num_exits:
            return self
        if self._filled:  # computed (and warned about) once per calibration
            return self._filled[0]
        slowest = int(seen[np.argmax([np.median(self.samples[k]) for k in seen])])
        out = list(self.samples)
        missing = [k for k in range(self.num_exits) if not self.samples[k].size]
        for k in missing:
            deeper = seen[seen > k]
            out[k] = self.samples[int(deeper[0]) if deeper.size else slowest]
        logger.warning("no calibration time for exit(s) %s: they are released like the next deeper seen exit "
                       "(or the slowest seen exit), which errs towards more delay", missing)
        self._filled.append(CleanTimes(tuple(out), self.counts.copy()))
        return self._filled[0]

    def quantiles(self, q: float) -> np.ndarray:
        """Per-exit ``q`` quantile (after :meth:`filled`), seconds."""
        q = check_quantile(q)
        full = self.filled()
        return np.array([float(np.quantile(a, q)) for a in full.samples])

    def medians(self) -> np.ndarray:
        """Per-exit median (after :meth:`filled`), seconds: TimeGuard's ``t_exit``."""
        return self.quantiles(0.5)

    def describe(self) -> dict[str, list[float] | list[int]]:
        """Shares and a few quantiles per exit in ms, for reports (NaN-free: unseen exits are filled)."""
        full = self.filled()
        out: dict[str, list[float] | list[int]] = {"counts": self.counts.tolist()}
        for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999)):
            out[name] = [float(np.quantile(a, q)) * 1e3 for a in full.samples]
        return out
