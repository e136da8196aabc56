"""Score-based (black-box) attack: an MLP on the top-3 posteriors, and its hybrid form with the exit.

The shadow-model attack of Salem et al. as used by the paper (§3.2, "Score-based"), with the
reference's ``MLP_BLACKBOX`` architecture. Unlike the reference (``topk(sorted=False)``) the top-3
posteriors are sorted in descending order, so the input does not depend on class order. The hybrid
form adds a one-hot of the **observed** exit (``Signals.exit_index``: exposed, or stolen from latency).
"""

from __future__ import annotations

from typing import Any

from mexit.attacks.mia._learned import Features, LearnedAttack
from mexit.attacks.mia.base import exit_one_hot, sorted_probs
from mexit.attacks.mia.registry import register
from mexit.attacks.signals import Signals


@register
class ScoreAttack(LearnedAttack):
    """MLP on the sorted top-3 posteriors (black-box adversary)."""

    name = "score"
    requires = frozenset({"probs"})
    hybrid = False
    description = "MLP on the sorted top-3 posteriors, trained on shadow signals"

    def _features(self, signals: Signals) -> Features:
        feats = {"top3": sorted_probs(signals.probs, 3)}
        if self.hybrid:
            feats["exit"] = exit_one_hot(signals)
        return feats

    def _build(self, signals: Signals) -> Any:
        from mexit.attacks.mia._nets import score_model

        return score_model(signals.num_exits if self.hybrid else None)


@register
class ScoreHybridAttack(ScoreAttack):
    """The score-based MLP plus a branch on the one-hot of the observed exit (paper §4.1)."""

    name = "score-hybrid"
    requires = frozenset({"probs", "exit_index"})
    hybrid = True
    description = "score-based MLP plus the one-hot of the observed exit"
