"""Threshold attacks on one per-sample value: loss and confidence, global and per observed exit.

No model is trained: the global form scores a sample by the value itself (``-loss``, Yeom et al.; or the
maximum posterior) and picks the threshold on shadow data. The hybrid form calibrates the value per
observed exit on shadow data (:class:`mexit.attacks.mia._calibration.ExitCalibration`): the score is
``P(member | exit, value)`` and one threshold on it is a per-exit threshold on the value
(``exit_thresholds_``). Exits with too few shadow samples, or unseen in shadow, use the global rule.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from mexit.attacks.mia._calibration import ExitCalibration
from mexit.attacks.mia.base import MembershipAttack, best_threshold, observed_exits
from mexit.attacks.mia.registry import register
from mexit.attacks.signals import Signals


class ValueThresholdAttack(MembershipAttack):
    """Score = a per-sample value (higher = more member-like); the hybrid form calibrates it per exit.

    ``min_exit_samples``: shadow samples an exit needs for its own calibration (else the global rule).
    After fitting a hybrid attack, ``exit_thresholds_[e]`` is the value at or above which a sample
    observed at exit ``e`` is predicted a member, and ``fallback_exits_`` the exits that used the
    global rule.
    """

    def __init__(self, *, seed: int = 0, min_exit_samples: int = 10) -> None:
        super().__init__(seed=seed)
        self.min_exit_samples = min_exit_samples
        self.calibration_: ExitCalibration | None = None
        self.exit_thresholds_: dict[int, float] = {}
        self.fallback_exits_: list[int] = []

    @abstractmethod
    def _value(self, signals: Signals) -> np.ndarray:
        """The per-sample membership value (higher = more likely a member)."""

    def _fit(self, shadow: Signals) -> None:
        values = np.asarray(self._value(shadow), dtype=np.float64)
        member = shadow.member.astype(bool)
        if not self.hybrid:
            self.threshold_ = best_threshold(values, member)
            return
        cal = ExitCalibration(shadow.num_exits, min_samples=self.min_exit_samples)
        cal.fit(values, observed_exits(shadow), member)
        self.calibration_ = cal
        self.threshold_ = best_threshold(cal.predict(values, observed_exits(shadow)), member)
        self.exit_thresholds_ = cal.exit_thresholds(self.threshold_)
        self.fallback_exits_ = cal.fallback_exits

    def _score(self, target: Signals) -> np.ndarray:
        values = np.asarray(self._value(target), dtype=np.float64)
        if not self.hybrid:
            return values
        assert self.calibration_ is not None
        return self.calibration_.predict(values, observed_exits(target))


@register
class LossAttack(ValueThresholdAttack):
    """Yeom et al.'s loss threshold: members have lower loss (score = -loss)."""

    name = "loss"
    requires = frozenset({"loss"})
    description = "threshold on the per-sample loss (score = -loss)"

    def _value(self, signals: Signals) -> np.ndarray:
        return -np.asarray(signals.loss, dtype=np.float64)


@register
class LossHybridAttack(LossAttack):
    """Loss threshold calibrated per observed exit."""

    name = "loss-hybrid"
    requires = frozenset({"loss", "exit_index"})
    hybrid = True
    description = "loss threshold per observed exit (score = P(member | exit, loss))"


@register
class ConfidenceAttack(ValueThresholdAttack):
    """Threshold on the maximum posterior: members are predicted more confidently."""

    name = "confidence"
    requires = frozenset({"probs"})
    description = "threshold on the maximum posterior"

    def _value(self, signals: Signals) -> np.ndarray:
        return np.asarray(signals.probs, dtype=np.float64).max(axis=1)


@register
class ConfidenceHybridAttack(ConfidenceAttack):
    """Confidence threshold calibrated per observed exit."""

    name = "confidence-hybrid"
    requires = frozenset({"probs", "exit_index"})
    hybrid = True
    description = "confidence threshold per observed exit (score = P(member | exit, max posterior))"
