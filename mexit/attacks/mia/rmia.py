"""RMIA (Zarifzadeh et al., ICML'24) on reference models, exit-oblivious and exit-aware.

For a sample ``x`` with true-class probability ``Pr(x | theta)`` on the target, RMIA forms the ratio
``LR(x) = Pr(x | theta) / Pr(x)``, where ``Pr(x)`` is the average over reference models:

* **online**: ``(mean_IN + mean_OUT) / 2`` of the references' ``Pr(x | theta_r)`` (all of them when a
  side is missing);
* **offline** (OUT references only): ``((1 + a) mean_OUT + (1 - a)) / 2`` — the paper's linear
  approximation of the missing IN models, with the ``a`` parameter chosen on the shadow signals (the
  adversary's own model, whose members it knows) by AUC over a grid unless given (``offline_a``).

The score is the share of population samples ``z`` (known non-members of the target) that ``x``
dominates: ``mean_z 1[LR(x) / LR(z) > gamma]``. With one population for all samples this is a
monotone function of ``LR(x)`` (the ROC equals that of ``LR(x)`` itself up to ties), so the population
sets the scale of the score (and the meaning of ``gamma``), not the ranking — unless it is matched per exit.

**Exit-aware (mexit's hybrid form).** Like is compared with like: the target's confidence comes from
the head of the exit it took, so ``Pr(x)`` averages the references that left at that same exit for the
sample (all of a side when none did), and ``z`` is restricted to population samples that the target sent
out at the same exit as ``x`` (the observed exit: exposed or stolen); exits with fewer than
``min_exit_population`` population samples use the whole population. This calibrates the ratio per exit,
and in doing so discards part of the evidence carried by the exit itself (members leave earlier).
Crediting the exit as part of the observation, ``Pr(x, e | theta) / Pr(x, e)`` with the target's exit
taken as certain, was tried and rejected: it measures how unusual the exit is under the IN/OUT mixture,
not whether it is IN-like, and ranked worse than chance on a synthetic world where the exit is
informative. The exit-aware LiRA (IN and OUT exit likelihoods) is the form that uses the exit as evidence.

Population: ``population=`` a :class:`~mexit.attacks.signals.Signals` of the **target** model on samples
it did not train on (``member`` all False; e.g. the shadow split or the dataset beyond the four splits),
with reference arrays for the same samples. Without one, the target's own query samples serve as ``z``
(harmless for the ranking; for the hybrid form, half of each exit's population are then members).
When fitting on shadow signals, the population is the shadow's own non-members if a population is given,
else the shadow's queried samples (mirroring what ``score`` will compare with).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexit.attacks.mia.base import best_threshold, observed_exits
from mexit.attacks.mia.lira import ReferenceAttack
from mexit.attacks.mia.registry import register
from mexit.attacks.reference import ReferenceError, probability_from_logit
from mexit.attacks.signals import Signals
from mexit.errors import ConfigError

A_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)
_TINY = 1e-30


def _side_mean(p: np.ndarray, side: np.ndarray, match: np.ndarray | None) -> np.ndarray:
    """Per-sample mean of ``p`` over one side's references; over the matched ones when a sample has any."""
    mean = np.where(side, p, 0.0).sum(axis=1) / np.maximum(side.sum(axis=1), 1)
    if match is None:
        return mean
    m = side & match
    cnt = m.sum(axis=1)
    return np.where(cnt > 0, np.where(m, p, 0.0).sum(axis=1) / np.maximum(cnt, 1), mean)


def reference_probability(ref_score: np.ndarray, ref_in: np.ndarray, *, online: bool, a: float,
                          match: np.ndarray | None = None) -> np.ndarray:
    """``Pr(x)`` per sample from the references' true-class probabilities (see the module docstring).

    ``match`` (n, R) bool restricts each side's average to the references marked for that sample (e.g. those
    that left at the target's exit), falling back to the whole side for a sample with none.
    """
    p = probability_from_logit(ref_score)
    inn = np.asarray(ref_in, dtype=bool)
    out = ~inn
    n_out, n_in = out.sum(axis=1), inn.sum(axis=1)
    mean_out = _side_mean(p, out, match)
    if not online:
        short = int((n_out < 1).sum())
        if short:
            raise ReferenceError(f"offline RMIA needs >= 1 OUT reference model for every sample, but {short} samples "
                                 "have none; add references that did not train on them (the shadow model is one)")
        return 0.5 * ((1.0 + a) * mean_out + (1.0 - a))
    if n_in.min() < 1 or n_out.min() < 1:
        short = int(((n_in < 1) | (n_out < 1)).sum())
        raise ReferenceError(f"online RMIA needs >= 1 IN and >= 1 OUT reference model for every sample, but {short} "
                             "samples lack one side; train more reference models on random halves of the pool")
    return 0.5 * (_side_mean(p, inn, match) + mean_out)


def likelihood_ratio(phi: np.ndarray, ref_score: np.ndarray, ref_in: np.ndarray, *, online: bool, a: float,
                     match: np.ndarray | None = None) -> np.ndarray:
    """``LR(x) = Pr(x | theta) / Pr(x)`` from the target's log-odds ``phi`` and the (matched) references."""
    ref_p = reference_probability(ref_score, ref_in, online=online, a=a, match=match)
    return probability_from_logit(phi) / np.maximum(ref_p, _TINY)


def rmia_scores(lr_x: np.ndarray, lr_z: np.ndarray, *, gamma: float = 1.0, exit_x: np.ndarray | None = None,
                exit_z: np.ndarray | None = None, min_exit_population: int = 20) -> np.ndarray:
    """Share of population ratios ``lr_z`` below ``lr_x / gamma``; exit-matched when both exits are given."""
    lr_x = np.asarray(lr_x, dtype=np.float64)
    lr_z = np.asarray(lr_z, dtype=np.float64)
    if not len(lr_z):
        raise ReferenceError("RMIA needs at least one population sample")

    def share(x: np.ndarray, z: np.ndarray) -> np.ndarray:
        zs = np.sort(z)
        return np.searchsorted(zs, x / gamma, side="left") / len(zs)

    if exit_x is None or exit_z is None:
        return share(lr_x, lr_z)
    exit_x = np.asarray(exit_x, dtype=np.int64)
    exit_z = np.asarray(exit_z, dtype=np.int64)
    out = share(lr_x, lr_z)
    for k in np.unique(exit_x):
        zk = lr_z[exit_z == k]
        if len(zk) >= min_exit_population:
            sel = exit_x == k
            out[sel] = share(lr_x[sel], zk)
    return out


class _RMIA(ReferenceAttack):
    online: bool = False

    def __init__(self, *, seed: int = 0, gamma: float = 1.0, offline_a: float | None = None,
                 population: Signals | None = None, min_exit_population: int = 20) -> None:
        super().__init__(seed=seed)
        if not gamma > 0:
            raise ConfigError(f"RMIA gamma must be > 0, got {gamma}")
        if offline_a is not None and not 0.0 <= offline_a <= 1.0:
            raise ConfigError(f"RMIA offline_a must lie in [0, 1], got {offline_a}")
        if population is not None:
            self._check_population(population)
        self.gamma = float(gamma)
        self.offline_a = offline_a
        self.a_: float = 1.0 if offline_a is None else float(offline_a)
        self.a_auc_: dict[float, float] = {}
        self.population = population
        self.min_exit_population = int(min_exit_population)

    def _check_population(self, population: Signals) -> None:
        if not isinstance(population, Signals):
            raise ConfigError(f"RMIA population must be mexit Signals, got {type(population).__name__}")
        if population.member.any():
            raise ReferenceError(f"the RMIA population holds {int(population.member.sum())} members of the target; "
                                 "its samples must be data the target was not trained on")
        for name in ("probs", "reference_score", "reference_in") + (("exit_index", "reference_exit") if self.hybrid
                                                                      else ()):
            if getattr(population, name) is None:
                raise ReferenceError(f"the RMIA population signals lack {name}; query the target and the references "
                                     "on the population samples")

    def _ratio(self, s: Signals) -> np.ndarray:
        match = None
        if self.hybrid:  # the target's confidence comes from the head of its exit: normalise by the same head's
            match = np.asarray(s.reference_exit, dtype=np.int64) == observed_exits(s)[:, None]
        return likelihood_ratio(self._phi(s), s.reference_score, s.reference_in, online=self.online, a=self.a_,
                                match=match)

    def _scores_against(self, target: Signals, population: Signals) -> np.ndarray:
        exits: dict[str, Any] = {}
        if self.hybrid:
            exits = {"exit_x": observed_exits(target), "exit_z": observed_exits(population),
                     "min_exit_population": self.min_exit_population}
        return rmia_scores(self._ratio(target), self._ratio(population), gamma=self.gamma, **exits)

    def _fit(self, shadow: Signals) -> None:
        member = shadow.member.astype(bool)
        # the same kind of population as score() will use, so the threshold transfers: known non-members when a
        # population is given, else the queried samples themselves
        population = shadow if self.population is None else shadow.subset(~member)
        if not self.online and self.offline_a is None:
            from sklearn.metrics import roc_auc_score

            for a in A_GRID:
                self.a_ = float(a)
                self.a_auc_[float(a)] = float(roc_auc_score(member, self._scores_against(shadow, population)))
            self.a_ = max(self.a_auc_, key=lambda k: (self.a_auc_[k], -abs(k - 0.5)))
        self.threshold_ = best_threshold(self._scores_against(shadow, population), member)

    def _score(self, target: Signals) -> np.ndarray:
        population = target if self.population is None else self._visible(self.population, role="population")
        return self._scores_against(target, population)


@register
class RmiaOfflineAttack(_RMIA):
    """Offline RMIA: OUT references with the ``a`` approximation of the IN side."""

    name = "rmia-offline"
    requires = frozenset({"probs", "reference_score", "reference_in"})
    description = "offline RMIA: Pr(x|target)/Pr(x) from OUT references (a tuned on shadow) vs population samples"


@register
class RmiaOnlineAttack(_RMIA):
    """Online RMIA: ``Pr(x)`` from IN and OUT references."""

    name = "rmia-online"
    requires = frozenset({"probs", "reference_score", "reference_in"})
    online = True
    description = "online RMIA: Pr(x|target)/Pr(x) from IN and OUT references vs population samples"


@register
class RmiaOfflineHybridAttack(RmiaOfflineAttack):
    """Exit-aware offline RMIA: references and population samples matched on the observed exit."""

    name = "rmia-offline-hybrid"
    requires = frozenset({"probs", "reference_score", "reference_in", "exit_index", "reference_exit"})
    hybrid = True
    description = "exit-aware offline RMIA: same-exit references and population samples"


@register
class RmiaOnlineHybridAttack(RmiaOnlineAttack):
    """Exit-aware online RMIA: references and population samples matched on the observed exit."""

    name = "rmia-online-hybrid"
    requires = frozenset({"probs", "reference_score", "reference_in", "exit_index", "reference_exit"})
    hybrid = True
    description = "exit-aware online RMIA: same-exit references and population samples"
