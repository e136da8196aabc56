"""Padding that does not leak: release every response at a high quantile of the slowest exit's clean time.

:class:`~mexit.defense.timeguard.ConstantTimePadding` releases at the final exit's *median* clean time, so
the slower half of final-exit responses overruns the target, leaves at completion and shows through
(issue 12: oracle 0.91 vs chance 0.79 on the default audit). :class:`QuantilePadding` pads to a high
quantile (default p99.9) of the calibrated clean times plus a margin, so only that tail overruns; the
overruns are released at completion (the guard never withholds an answer) and counted by
:class:`~mexit.defense.guarded.GuardedRuntime`, so their real rate is visible.

The target is the maximum over exits of the per-exit quantile: normally the final exit's, but robust when a
shallower exit happens to be slower (e.g. a large head) or the final exit was never seen in calibration
(:meth:`CleanTimes.filled`). It does not depend on the input, so no key is needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mexit.defense.calibration import CleanTimes, check_quantile
from mexit.defense.timeguard import _check_exits
from mexit.errors import ConfigError

DEFAULT_QUANTILE = 0.999


class QuantilePadding:
    """Release every response at ``max_k quantile_q(clean times of exit k) + margin_s``; a DelayPolicy.

    Call :meth:`fit` with the calibration's :class:`CleanTimes` before use (``GuardedRuntime`` does).
    """

    def __init__(self, quantile: float = DEFAULT_QUANTILE, margin_s: float = 0.0) -> None:
        self.quantile = check_quantile(quantile, "padding quantile")
        margin = float(margin_s)
        if not (math.isfinite(margin) and margin >= 0):
            raise ConfigError(f"padding margin must be a finite number of seconds >= 0, got {margin_s!r}")
        self.margin_s = margin
        self.release_s: float | None = None
        self.num_exits: int | None = None

    def fit(self, clean: CleanTimes) -> QuantilePadding:
        """Set the release time from the calibrated distributions."""
        self.release_s = float(np.max(clean.quantiles(self.quantile))) + self.margin_s
        self.num_exits = clean.num_exits
        return self

    def _release(self) -> float:
        if self.release_s is None:
            raise ConfigError("padding is not calibrated: call fit(CleanTimes) (GuardedRuntime does this)")
        return self.release_s

    def target_latency_s(self, x_batch: np.ndarray, exit_index: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        release = self._release()
        n = int(np.asarray(x_batch).shape[0]) if np.ndim(x_batch) else 1
        _check_exits(exit_index, n, int(self.num_exits or np.size(clean_times_s)))
        return np.full(n, release, dtype=np.float64)

    def release_cdf(self, exit_k: int, grid_s: np.ndarray, clean_times_s: np.ndarray | None = None) -> np.ndarray:
        """CDF of the release time of exit ``exit_k`` on ``grid_s``: a step at the padding target."""
        return (np.asarray(grid_s, dtype=np.float64) >= self._release()).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        return {"policy": "padding", "quantile": self.quantile, "margin_s": self.margin_s, "release_s": self.release_s}

    def __repr__(self) -> str:
        return f"QuantilePadding(quantile={self.quantile!r}, margin_s={self.margin_s!r})"
