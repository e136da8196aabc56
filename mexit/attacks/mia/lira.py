"""LiRA (Carlini et al., S&P'22) on reference models, exit-oblivious and exit-aware.

The statistic of a sample on a model is the logit-scaled confidence of its true class,
``phi = log p_y - log sum_{y' != y} p_y'`` (:func:`mexit.attacks.reference.logit_confidence`). For each
sample, the reference models that trained on it (IN) and those that did not (OUT) give Gaussians of
``phi``; the target's ``phi`` is scored against them:

* **online**: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` (a log likelihood ratio);
* **offline** (OUT models only, e.g. the shadow model alone): the one-sided surprisal
  ``-log P(Z >= phi)``, ``Z ~ N(mu_out, s_out)`` — how unusually high the target's confidence is for a
  model that did not train on the sample (the LiRA paper's one-sided test, on a log scale that does not
  saturate for very confident members).

``mu`` is the per-sample mean over the references of that side. The variance is either per-sample (needs
at least 2 references of the side for every sample) or *fixed*: one standard deviation of all reference
values of that side, pooled over samples and models, as in the LiRA reference code (works with a single
reference, better with few).

**Exit-aware (mexit's hybrid form).** A multi-exit target also reveals the exit ``e`` a sample left at
(exposed, or stolen from response times — whatever ``Signals.exit_index`` holds). The hybrid form models
the pair ``(phi, e)`` as ``p(e | side, x) * p(phi | e, side, x)``. ``phi`` comes from a different head at
every exit, so ``p(phi | e, side, x)`` is a per-exit Gaussian around the sample's own mean:
``N(mu(x) + shift[e], spread[e])``, with the exit's offset and spread pooled over every (sample,
reference) pair of that side that left at ``e`` (robust with few references). ``p(e | side, x)`` is the
share of the side's references that left at ``e`` for this sample, shrunk towards the side's pooled exit
distribution (Dirichlet smoothing, strength ``exit_smoothing``). The per-exit spreads are always pooled
(``fix_variance`` only applies to the exit-oblivious forms); they need 2 references of a side for a sample
to contribute, and fall back to the side's pooled standard deviation otherwise. Online:
``[log N_e(phi | IN) + log p(e | IN, x)] - [log N_e(phi | OUT) + log p(e | OUT, x)]``. Offline:
``-log P_e(Z >= phi | OUT) - log p(e | OUT, x) = -log P(exit e and Z >= phi | OUT)``, the surprisal under
OUT of leaving at this exit with at least this confidence (no IN model to form a ratio with).
Response times beyond the exit are not used: within one exit they carry no membership signal the exit
does not (the stolen exit already encodes what timing reveals).

Every variant is a :class:`~mexit.attacks.mia.base.MembershipAttack`: ``fit(shadow)`` scores the
shadow's own samples (which must carry reference arrays too — e.g. the target model as the one OUT
reference of the shadow's samples) and picks the decision threshold there; ``score(target)`` is
vectorised over samples x references (numpy/scipy; 64 models x 5,000 samples in milliseconds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import norm

from mexit.attacks.mia.base import MembershipAttack, best_threshold, observed_exits
from mexit.attacks.mia.registry import register
from mexit.attacks.reference import ReferenceError, logit_confidence
from mexit.attacks.signals import Signals

SIGMA_FLOOR = 1e-3  # in logit units: identical reference values must not give an infinite likelihood
MIN_EXIT_PAIRS = 10  # (sample, reference) values an exit needs for its own fixed variance


# ------------------------------------------------------------------------------------------ array core
def _side_stats(v: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample count, mean and (ddof 0) std of ``v`` over the True entries of ``mask`` (n, R)."""
    cnt = mask.sum(axis=1)
    safe = np.maximum(cnt, 1)
    mean = np.where(mask, v, 0.0).sum(axis=1) / safe
    var = np.where(mask, (v - mean[:, None]) ** 2, 0.0).sum(axis=1) / safe
    return cnt, mean, np.sqrt(var)


def _pooled_std(v: np.ndarray, mask: np.ndarray) -> float:
    vals = v[mask]
    return float(max(vals.std(), SIGMA_FLOOR)) if vals.size else SIGMA_FLOOR


def _require(cnt: np.ndarray, need: int, side: str, variant: str, hint: str) -> None:
    short = int((cnt < need).sum())
    if short:
        raise ReferenceError(f"{variant} needs >= {need} {side} reference model(s) for every sample, but {short} of "
                             f"{len(cnt)} samples have fewer (min {int(cnt.min())}); {hint}")


def _gaussian_side(phi: np.ndarray, ref: np.ndarray, side: np.ndarray, *, fix_variance: bool, variant: str,
                   side_name: str, target_exit: np.ndarray | None, ref_exit: np.ndarray | None,
                   num_exits: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) per sample of one side (IN or OUT); conditioned on the target's exit when exits are given."""
    need = 1 if fix_variance or target_exit is not None else 2
    hint = ("train more reference models (each sample is IN for about half)" if side_name == "IN" else
            "add reference models that did not train on these samples (the shadow model is one)")
    if need == 2:
        hint += ", or use fix_variance=True"
    cnt, mu, sd = _side_stats(ref, side)
    _require(cnt, need, side_name, variant, hint)
    if target_exit is None or ref_exit is None:
        sigma = np.full(len(phi), _pooled_std(ref, side)) if fix_variance else np.maximum(sd, SIGMA_FLOOR)
        return mu, sigma
    shift, spread = _exit_residuals(ref, side, mu, cnt, ref_exit, num_exits)
    return mu + shift[target_exit], spread[target_exit]


def _exit_residuals(ref: np.ndarray, side: np.ndarray, mu: np.ndarray, cnt: np.ndarray, ref_exit: np.ndarray,
                    num_exits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per exit: mean and std of a reference value around its sample's mean, pooled over samples and models.

    A sample's value at exit ``e`` is modelled as ``mu(x) + shift[e] + N(0, spread[e])``: the head of each exit
    has its own offset and noise, estimated from every (sample, reference) pair of the side that left at
    ``e`` — robust with few references, unlike per-sample exit-matched means. Residuals are only defined for
    samples with >= 2 references of the side (scaled by ``n / (n - 1)`` for the lost degree of freedom);
    an exit with fewer than ``MIN_EXIT_PAIRS`` such pairs uses shift 0 and the side's pooled standard
    deviation (the fixed variance of the exit-oblivious form).
    """
    usable = side & (cnt[:, None] >= 2)
    resid = ref - mu[:, None]
    scale = cnt / np.maximum(cnt - 1, 1)
    fallback = _pooled_std(ref, side)
    shift = np.zeros(num_exits)
    spread = np.full(num_exits, fallback)
    for k in range(num_exits):
        sel = usable & (ref_exit == k)
        if sel.sum() >= MIN_EXIT_PAIRS:
            r = resid[sel]
            shift[k] = r.mean()
            spread[k] = max(float(np.sqrt(((r - r.mean()) ** 2 * np.broadcast_to(scale[:, None], sel.shape)[sel])
                                          .mean())), SIGMA_FLOOR)
    return shift, spread


def exit_log_likelihood(target_exit: np.ndarray, ref_exit: np.ndarray, side: np.ndarray, num_exits: int,
                        smoothing: float = 1.0) -> np.ndarray:
    """``log p(e | side, x)`` per sample: the share of the side's references that left at the target's exit.

    Shrunk towards the side's pooled exit distribution (add-one smoothed) with Dirichlet strength
    ``smoothing``, so a sample with few references or an exit no reference took still gets a finite value.
    """
    pooled = np.bincount(ref_exit[side], minlength=num_exits).astype(np.float64)
    prior = (pooled + 1.0) / (pooled.sum() + num_exits)
    hits = (side & (ref_exit == target_exit[:, None])).sum(axis=1)
    return np.log((hits + smoothing * prior[target_exit]) / (side.sum(axis=1) + smoothing))


def lira_scores(phi: np.ndarray, ref_score: np.ndarray, ref_in: np.ndarray, *, online: bool,
                fix_variance: bool = True, target_exit: np.ndarray | None = None,
                ref_exit: np.ndarray | None = None, num_exits: int = 1, exit_smoothing: float = 1.0) -> np.ndarray:
    """LiRA membership scores (higher = member) for target statistics ``phi`` (n,) against references (n, R).

    ``ref_in`` (n, R) marks the references that trained on each sample. Exit-aware when ``target_exit`` (n,)
    and ``ref_exit`` (n, R) are given. Raises :class:`ReferenceError` when a sample lacks the references its
    variant needs (online: IN and OUT; per-sample variance: 2 of each side).
    """
    phi = np.asarray(phi, dtype=np.float64)
    ref = np.asarray(ref_score, dtype=np.float64)
    inn = np.asarray(ref_in, dtype=bool)
    if ref.ndim != 2 or ref.shape != inn.shape or ref.shape[0] != len(phi):
        raise ReferenceError(f"reference arrays must be (samples, references) for {len(phi)} samples, got "
                             f"{ref.shape} and {inn.shape}")
    exit_aware = target_exit is not None and ref_exit is not None
    te = np.asarray(target_exit, dtype=np.int64) if exit_aware else None
    re = np.asarray(ref_exit, dtype=np.int64) if exit_aware else None
    variant = f"{'online' if online else 'offline'} LiRA{' (exit-aware)' if exit_aware else ''}"
    kw: dict[str, Any] = {"fix_variance": fix_variance, "variant": variant, "target_exit": te, "ref_exit": re,
                          "num_exits": num_exits}
    if online:  # IN first: a short IN side is the usual problem (too few references)
        mu_in, s_in = _gaussian_side(phi, ref, inn, side_name="IN", **kw)
    mu_out, s_out = _gaussian_side(phi, ref, ~inn, side_name="OUT", **kw)
    if not online:
        score = -norm.logsf((phi - mu_out) / s_out)
        if exit_aware:
            assert te is not None and re is not None
            score = score - exit_log_likelihood(te, re, ~inn, num_exits, exit_smoothing)
        return score
    score = norm.logpdf(phi, mu_in, s_in) - norm.logpdf(phi, mu_out, s_out)
    if exit_aware:
        assert te is not None and re is not None
        score = score + exit_log_likelihood(te, re, inn, num_exits, exit_smoothing) \
            - exit_log_likelihood(te, re, ~inn, num_exits, exit_smoothing)
    return score


# ------------------------------------------------------------------------------------------ attacks
class ReferenceAttack(MembershipAttack):
    """Shared plumbing of the reference-model attacks: reference checks, the statistic, the shadow threshold."""

    def _visible(self, signals: Signals, *, role: str) -> Signals:
        if isinstance(signals, Signals) and getattr(signals, "reference_score", None) is None:
            raise ReferenceError(f"{self.name} attack needs reference-model scores, but the {role} signals hold "
                                 "none; attach them with mexit.attacks.reference.with_references (the shadow model "
                                 "is one OUT reference for the target's samples, the target for the shadow's)")
        if "reference_exit" in self.requires and isinstance(signals, Signals) and signals.reference_exit is None:
            raise ReferenceError(f"{self.name} attack needs the exits the reference models took, but the {role} "
                                 "signals record none; query the references with mexit.attacks.reference")
        return super()._visible(signals, role=role)

    @staticmethod
    def _phi(signals: Signals) -> np.ndarray:
        return logit_confidence(signals.probs, signals.true_label).astype(np.float64)

    def _fit(self, shadow: Signals) -> None:
        self.threshold_ = best_threshold(self._score(shadow), shadow.member.astype(bool))


class _LiRA(ReferenceAttack):
    online: bool = False

    def __init__(self, *, seed: int = 0, fix_variance: bool = True, exit_smoothing: float = 4.0) -> None:
        super().__init__(seed=seed)
        self.fix_variance = bool(fix_variance)
        self.exit_smoothing = float(exit_smoothing)

    def _score(self, target: Signals) -> np.ndarray:
        exits: dict[str, Any] = {}
        if self.hybrid:
            exits = {"target_exit": observed_exits(target), "ref_exit": target.reference_exit,
                     "num_exits": target.num_exits, "exit_smoothing": self.exit_smoothing}
        return lira_scores(self._phi(target), target.reference_score, target.reference_in, online=self.online,
                           fix_variance=self.fix_variance, **exits)


@register
class LiraOfflineAttack(_LiRA):
    """Offline LiRA: one-sided test against the OUT references (one reference suffices)."""

    name = "lira-offline"
    requires = frozenset({"probs", "reference_score", "reference_in"})
    description = "offline LiRA: true-class log-odds vs Gaussians of OUT reference models"


@register
class LiraOnlineAttack(_LiRA):
    """Online LiRA: likelihood ratio of IN vs OUT Gaussians per sample."""

    name = "lira-online"
    requires = frozenset({"probs", "reference_score", "reference_in"})
    online = True
    description = "online LiRA: likelihood ratio of IN vs OUT reference Gaussians per sample"


@register
class LiraOfflineHybridAttack(LiraOfflineAttack):
    """Exit-aware offline LiRA: same-exit OUT references and the exit's surprisal under OUT."""

    name = "lira-offline-hybrid"
    requires = frozenset({"probs", "reference_score", "reference_in", "exit_index", "reference_exit"})
    hybrid = True
    description = "exit-aware offline LiRA: OUT Gaussians of same-exit references plus the exit's surprisal"


@register
class LiraOnlineHybridAttack(LiraOnlineAttack):
    """Exit-aware online LiRA: likelihood ratio of (confidence, exit) under per-exit IN/OUT models."""

    name = "lira-online-hybrid"
    requires = frozenset({"probs", "reference_score", "reference_in", "exit_index", "reference_exit"})
    hybrid = True
    description = "exit-aware online LiRA: likelihood ratio of (confidence, exit) under IN/OUT references"
