"""Exit-only attack (paper Fig. 11): membership from the observed exit index alone.

Members tend to leave early and non-members late. The score of a sample observed at exit ``e`` is the
shadow estimate of ``P(member | exit = e)``, class-balanced (members and non-members weigh the same in
total) and Laplace-smoothed, so an exit unseen in shadow scores 0.5.
"""

from __future__ import annotations

import numpy as np

from mexit.attacks.mia.base import MembershipAttack, balanced_weights, best_threshold, observed_exits
from mexit.attacks.mia.registry import register
from mexit.attacks.signals import Signals
from mexit.errors import ConfigError


@register
class ExitOnlyAttack(MembershipAttack):
    """Score = Laplace-smoothed shadow ``P(member | observed exit)``; ``exit_member_rate_`` per exit."""

    name = "exit-only"
    requires = frozenset({"exit_index"})
    hybrid = True
    description = "membership from the observed exit alone: shadow P(member | exit)"

    def __init__(self, *, seed: int = 0, alpha: float = 1.0) -> None:
        super().__init__(seed=seed)
        if not alpha > 0:
            raise ConfigError(f"exit-only smoothing alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.exit_member_rate_: np.ndarray = np.empty(0)

    def _fit(self, shadow: Signals) -> None:
        exits = observed_exits(shadow)
        member = shadow.member.astype(bool)
        w = balanced_weights(member)
        m = np.bincount(exits[member], weights=w[member], minlength=shadow.num_exits)
        u = np.bincount(exits[~member], weights=w[~member], minlength=shadow.num_exits)
        self.exit_member_rate_ = (m + self.alpha) / (m + u + 2.0 * self.alpha)
        self.threshold_ = best_threshold(self.exit_member_rate_[exits], member)

    def _score(self, target: Signals) -> np.ndarray:
        return self.exit_member_rate_[observed_exits(target)]
