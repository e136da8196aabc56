"""Per-exit calibration of a one-dimensional membership signal: the hybrid decision rules' core.

The paper's hybrid decision functions (§4.3) give each exit its own threshold, learnt on the shadow
samples that left at that exit. :class:`ExitCalibration` turns that into a continuous score: for each
observed exit ``e`` it estimates ``P(member | exit = e, value)`` on shadow data with a one-feature
logistic regression (class-balanced weights, monotone non-decreasing in the value), so that

* within one exit, the score ranks samples exactly as the raw value does, and a global threshold on the
  score is a per-exit threshold on the value (``exit_thresholds``);
* across exits, the score carries what the exit itself says about membership (members tend to leave
  early, paper Fig. 11) — which a per-exit standardisation would throw away.

Exits with fewer than ``min_samples`` shadow samples (or unseen in shadow) fall back to the same model
fitted on all shadow samples (the global rule). An exit whose shadow samples are all of one class, or
whose value does not increase membership odds, gets a constant: the Laplace-smoothed, class-balanced
member share of that exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from mexit.attacks.mia.base import balanced_weights


@dataclass(frozen=True)
class _Logistic:
    """``sigmoid(coef * (value - mean) / std + intercept)``; ``coef`` is 0 for a constant model."""

    coef: float
    intercept: float
    mean: float
    std: float

    def __call__(self, values: np.ndarray) -> np.ndarray:
        z = self.coef * (np.asarray(values, dtype=np.float64) - self.mean) / self.std + self.intercept
        return expit(z)  # scipy's logistic: no overflow warning for scores far from the boundary

    def value_at(self, p: float) -> float:
        """The value where the calibrated probability crosses ``p`` (±inf for a constant model)."""
        if not 0.0 < p < 1.0:
            return -np.inf if p <= 0.0 else np.inf
        if self.coef <= 0:
            return -np.inf if self(np.zeros(1))[0] >= p else np.inf
        return self.mean + self.std * (np.log(p / (1 - p)) - self.intercept) / self.coef


def _constant(member: np.ndarray, weights: np.ndarray) -> _Logistic:
    """Laplace-smoothed, class-balanced member share as a constant model."""
    m = float(weights[member].sum())
    u = float(weights[~member].sum())
    p = (m + 1.0) / (m + u + 2.0)
    return _Logistic(0.0, float(np.log(p / (1 - p))), 0.0, 1.0)


def _fit_one(values: np.ndarray, member: np.ndarray, weights: np.ndarray, c: float) -> _Logistic:
    from sklearn.linear_model import LogisticRegression

    if member.all() or not member.any():
        return _constant(member, weights)
    mean, std = float(values.mean()), float(values.std())
    if not std > 1e-12:
        return _constant(member, weights)
    z = ((values - mean) / std)[:, None]
    model = LogisticRegression(C=c).fit(z, member, sample_weight=weights)
    coef = float(model.coef_[0, 0])
    if coef <= 0:  # the value does not raise membership odds here: keep the exit's prior only
        return _constant(member, weights)
    return _Logistic(coef, float(model.intercept_[0]), mean, std)


class ExitCalibration:
    """Shadow-fitted ``P(member | observed exit, value)``; see the module docstring."""

    def __init__(self, num_exits: int, *, min_samples: int = 10, c: float = 1.0) -> None:
        self.num_exits = num_exits
        self.min_samples = min_samples
        self.c = c
        self.global_: _Logistic | None = None
        self.per_exit_: dict[int, _Logistic] = {}
        self.shadow_counts_: dict[int, tuple[int, int]] = {}

    def fit(self, values: np.ndarray, exits: np.ndarray, member: np.ndarray) -> ExitCalibration:
        values = np.asarray(values, dtype=np.float64)
        exits = np.asarray(exits, dtype=np.int64)
        member = np.asarray(member, dtype=bool)
        weights = balanced_weights(member)  # global weights: per-exit fits keep the exit's membership prior
        self.global_ = _fit_one(values, member, weights, self.c)
        self.per_exit_ = {}
        for e in range(self.num_exits):
            mask = exits == e
            self.shadow_counts_[e] = (int(member[mask].sum()), int((~member[mask]).sum()))
            if mask.sum() >= self.min_samples:
                self.per_exit_[e] = _fit_one(values[mask], member[mask], weights[mask], self.c)
        return self

    def model_for(self, exit_index: int) -> _Logistic:
        """The exit's own model, or the global one when the exit had too few shadow samples."""
        assert self.global_ is not None, "fit first"
        return self.per_exit_.get(int(exit_index), self.global_)

    def predict(self, values: np.ndarray, exits: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        exits = np.asarray(exits, dtype=np.int64)
        out = np.empty(len(values), dtype=np.float64)
        for e in np.unique(exits):
            mask = exits == e
            out[mask] = self.model_for(int(e))(values[mask])
        return out

    def exit_thresholds(self, p: float) -> dict[int, float]:
        """Per exit, the value at or above which a sample is called a member when the score threshold is ``p``."""
        return {e: float(self.model_for(e).value_at(p)) for e in range(self.num_exits)}

    @property
    def fallback_exits(self) -> list[int]:
        """Exits scored with the global rule (too few or no shadow samples)."""
        return [e for e in range(self.num_exits) if e not in self.per_exit_]
