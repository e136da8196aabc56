"""The membership-attack interface, and the helpers every attack shares.

An attack is fitted on **shadow** signals only (the adversary's own model, whose members it knows) and
then scores **target** signals. ``fit`` is the only method that sees membership labels, and ``score`` is
the only method that takes target signals; :meth:`MembershipAttack.score` hands the implementation a view
of the target in which membership is blanked out, so no attack can select a model, an epoch or a
threshold on the target (a bug of the reference code).

What an attack may read is declared in ``requires``; every other optional field is removed from the
signals before the implementation sees them. In particular ``true_exit`` (the exit actually taken,
kept for evaluating exit stealing) is never visible: hybrid attacks read ``exit_index``, which holds
whatever the adversary observed — exposed by the server (Adversary 1) or stolen from latency
(Adversary 2).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import fields, replace
from typing import ClassVar, Self

import numpy as np

from mexit.attacks.signals import Signals, SignalsError
from mexit.errors import UserError

logger = logging.getLogger(__name__)

#: Optional ``Signals`` arrays (``None`` when not observed), read off the dataclass: a new signal is one field there.
OPTIONAL_FIELDS = frozenset(f.name for f in fields(Signals) if f.default is None)
#: Fields that describe the adversary's access but are always recorded (labels are always returned).
ALWAYS_PRESENT = frozenset({"pred_label", "true_label"})

_FIELD_WORDS = {
    "probs": "probabilities",
    "loss": "per-sample losses (computed from probabilities)",
    "exit_index": "the exit index of each query",
    "embedding": "white-box embeddings",
    "gradient": "white-box last-layer gradients",
    "label_only_score": "label-only robustness scores",
    "latency_ns": "latencies",
}
_FIELD_HINTS = {
    "probs": "use a label-only attack, or query a deployment that exposes probabilities",
    "loss": "use a label-only attack, or query a deployment that exposes probabilities",
    "exit_index": "steal it from latency (mexit.attacks.stealing) or use the non-hybrid attack",
    "embedding": "collect white-box signals from a checkpoint, or use a black-box attack",
    "gradient": "collect white-box signals from a checkpoint, or use a black-box attack",
    "label_only_score": "collect it with mexit.attacks.mia.label_only.collect_label_only_scores",
    "latency_ns": "collect signals with repeats >= 1",
}


class NotFittedError(UserError):
    """An attack was asked to score before it was fitted on shadow signals."""


def _exposure(signals: Signals) -> str:
    if signals.probs is not None:
        return "exposes probabilities"
    return "exposes labels only"


def missing_field_error(attack: str, field: str, signals: Signals, role: str) -> SignalsError:
    """The message for an attack that needs ``field`` but the ``role`` signals do not have it."""
    what = _FIELD_WORDS.get(field, field)
    if field in ("probs", "loss") and signals.probs is None:
        why = f"the {role} {_exposure(signals)}"
    elif field == "exit_index":
        why = f"the {role} signals record no exit (the deployment does not expose exits)"
    else:
        why = f"the {role} signals hold none"
    hint = _FIELD_HINTS.get(field, "")
    return SignalsError(f"{attack} attack needs {what}, but {why}" + (f"; {hint}" if hint else ""))


class MembershipAttack(ABC):
    """Fit on shadow signals, then score target signals; members are the positive class.

    Subclasses set ``name`` (registry key), ``requires`` (the ``Signals`` fields the adversary must
    observe), ``hybrid`` (whether the attack uses the observed exit) and implement ``_fit`` and
    ``_score``. After ``fit``, ``threshold_`` is the decision threshold on the score, chosen on shadow
    data only to maximise balanced accuracy; ``predict`` is ``score >= threshold_``.
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]]
    hybrid: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = int(seed)
        self.threshold_: float = np.nan
        self._template: Signals | None = None

    # ------------------------------------------------------------------------------------------ API
    def fit(self, shadow: Signals) -> Self:
        """Fit on the shadow signals (ground-truth membership of the adversary's own model)."""
        view = self._visible(shadow, role="shadow")
        member = view.member.astype(bool)
        if len(view) == 0 or member.all() or not member.any():
            raise SignalsError(f"{self.name} attack needs shadow signals with both members and non-members, got "
                               f"{int(member.sum())} members and {int((~member).sum())} non-members")
        self._template = view.subset(np.arange(1))
        self._fit(view)
        if np.isnan(self.threshold_):  # pragma: no cover - a bug in a subclass
            raise AssertionError(f"{self.name} attack did not set a decision threshold")
        return self

    def score(self, target: Signals) -> np.ndarray:
        """Continuous membership score per target sample (higher = more likely a member)."""
        if self._template is None:
            raise NotFittedError(f"{self.name} attack is not fitted; call fit(shadow_signals) before score()")
        view = self._visible(target, role="target")
        self._template.check_compatible(
            view, what=f"the shadow signals the {self.name} attack was fitted on and the target signals")
        self._check_target(view)
        scores = np.asarray(self._score(view), dtype=np.float64)
        if scores.shape != (len(view),):  # pragma: no cover - a bug in a subclass
            raise AssertionError(f"{self.name} returned scores of shape {scores.shape} for {len(view)} samples")
        return scores

    def predict(self, target: Signals) -> np.ndarray:
        """Hard membership decision: ``score(target) >= threshold_`` (threshold chosen on shadow data)."""
        return self.score(target) >= self.threshold_

    @classmethod
    def info(cls) -> dict[str, object]:
        """Name, required fields, hybrid flag and one-line description (for listings and reports)."""
        return {"name": cls.name, "requires": sorted(cls.requires), "hybrid": cls.hybrid,
                "description": cls.description}

    # ------------------------------------------------------------------------------- for subclasses
    @abstractmethod
    def _fit(self, shadow: Signals) -> None:
        """Fit on the visible shadow signals and set ``threshold_``."""

    @abstractmethod
    def _score(self, target: Signals) -> np.ndarray:
        """Scores for the visible target signals (membership blanked out)."""

    def _check_target(self, target: Signals) -> None:  # noqa: B027 - an optional hook, empty by default
        """Extra shape checks beyond :meth:`Signals.check_compatible` (e.g. white-box feature sizes)."""

    # ------------------------------------------------------------------------------------- internals
    def _visible(self, signals: Signals, *, role: str) -> Signals:
        """The signals restricted to what this attack may read; the target's membership is blanked out."""
        if not isinstance(signals, Signals):
            raise SignalsError(f"{self.name} attack takes mexit Signals, got {type(signals).__name__}")
        for name in sorted(self.requires & OPTIONAL_FIELDS):
            if getattr(signals, name) is None:
                raise missing_field_error(self.name, name, signals, role)
        hidden: dict[str, object] = {name: None for name in OPTIONAL_FIELDS - self.requires}
        hidden["true_exit"] = None  # evaluation only: never an attack input
        if role == "target":
            hidden["member"] = np.zeros(len(signals), dtype=bool)
        return replace(signals, **hidden)


# ----------------------------------------------------------------------------------- shared helpers
def balanced_weights(member: np.ndarray) -> np.ndarray:
    """Per-sample weights ``n / (2 n_class)``: members and non-members weigh the same in total."""
    member = np.asarray(member, dtype=bool)
    n, n_mem = len(member), int(member.sum())
    return np.where(member, n / (2.0 * max(n_mem, 1)), n / (2.0 * max(n - n_mem, 1)))


def best_threshold(scores: np.ndarray, member: np.ndarray) -> float:
    """The threshold ``t`` maximising balanced accuracy of ``score >= t`` on these (shadow) samples.

    The cut is placed halfway between the chosen score and the next lower distinct score, so that the
    decision does not hinge on a tie with one shadow sample. Returns ``inf`` (predict no member) when no
    cut beats chance.
    """
    from sklearn.metrics import roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    if member.all() or not member.any():
        raise SignalsError("choosing a threshold needs both members and non-members")
    fpr, tpr, thresholds = roc_curve(member, scores, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    cut = float(thresholds[best])
    if not np.isfinite(cut) or tpr[best] - fpr[best] <= 0:
        return float("inf")
    lower = scores[scores < cut]
    return 0.5 * (cut + float(lower.max())) if len(lower) else cut


def holdout_split(member: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified split of the shadow samples into (fit, held-out) indices for model selection."""
    from sklearn.model_selection import train_test_split

    member = np.asarray(member, dtype=bool)
    if not 0.0 < fraction < 1.0:
        raise UserError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    if min(int(member.sum()), int((~member).sum())) < 4:
        raise SignalsError(f"need at least 4 shadow members and 4 non-members to hold some out for model "
                           f"selection, got {int(member.sum())} and {int((~member).sum())}")
    idx = np.arange(len(member))
    fit_idx, held_idx = train_test_split(idx, test_size=fraction, random_state=seed, stratify=member)
    return np.sort(fit_idx), np.sort(held_idx)


def observed_exits(signals: Signals) -> np.ndarray:
    """The exit the adversary observed for each sample: ``signals.exit_index`` and nothing else."""
    if signals.exit_index is None:  # pragma: no cover - _visible has already refused
        raise SignalsError("these signals record no observed exit")
    return np.asarray(signals.exit_index, dtype=np.int64)


def exit_one_hot(signals: Signals) -> np.ndarray:
    """One-hot (n, num_exits) float32 of the observed exit (the hybrid input of learned attacks)."""
    return np.eye(signals.num_exits, dtype=np.float32)[observed_exits(signals)]


def sorted_probs(probs: np.ndarray, k: int | None = None) -> np.ndarray:
    """Posteriors sorted in descending order (the top ``k``, zero-padded when there are fewer classes)."""
    out = -np.sort(-np.asarray(probs, dtype=np.float32), axis=1)
    if k is None:
        return out
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])))
    return np.ascontiguousarray(out[:, :k])
