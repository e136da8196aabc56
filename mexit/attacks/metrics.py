"""Attack and leakage metrics, with members as the positive class everywhere.

Membership attacks (:func:`attack_metrics`):

* **AUC** from *continuous* scores (``sklearn.metrics.roc_auc_score``) — never from hard 0/1
  predictions, which is what the reference code did (its "AUC" was (TPR+TNR)/2).
* **Balanced accuracy**, the paper's ASR (its attack sets are balanced, so ASR = accuracy =
  balanced accuracy), at one decision threshold: ``score >= threshold`` means "member". The
  threshold must come from *shadow* data (:func:`best_threshold` picks the one maximising
  balanced accuracy there); without one, ``0.5`` is used, which is only meaningful for scores that
  are member probabilities. ``balanced_accuracy_best`` is the maximum over all thresholds *on the
  evaluated data itself* (LiRA's ``acc = max(1 - (fpr + 1 - tpr) / 2)``): an optimistic upper bound,
  reported for comparison with the literature, not as the attack's accuracy.
* **TPR at a fixed low FPR** (0.1 % and 1 % by default) with the LiRA / Privacy Meter convention
  ``tpr[np.where(fpr < target)[0][-1]]`` on ``sklearn.metrics.roc_curve(drop_intermediate=False)``: the best TPR of a
  deterministic threshold whose FPR is strictly below the target (a step function, not a linear
  interpolation between ROC points, which would describe a randomised classifier).
  ``method="interp"`` gives the interpolated value instead.
* Every number comes with a **bootstrap confidence interval**: percentile method, stratified
  (members and non-members are resampled separately, so every replicate keeps the class counts and
  the metrics stay defined), seeded. Replicates are computed with resampling *weights* on one sorted
  order (exact, vectorised), and the unit-weight case reproduces scikit-learn's values (tested).
  When there are too few non-members to resolve a target FPR (fewer than ``10 / fpr``) a
  ``warnings`` entry says so: the estimate rests on a handful of samples.

Low-FPR reporting and comparisons (issue 13): :func:`low_fpr_tpr` (TPR at each FPR with an exact
Clopper–Pearson interval, or "not measurable: needs >= N non-members"), :func:`paired_bootstrap` (the
interval of the difference between two attacks scored on the same samples — the only valid way to call
one better than the other), :func:`significance_statement` (does the AUC interval include 0.5, lie above it, or
below it: an inverted rule).

Leakage statistics: :func:`per_exit_js` (per exit: JS divergence of member vs non-member log-loss in
equal-mass bins, with its permutation baseline, p-value and counts, reported only for exits with enough
samples), :func:`js_divergence_per_exit` (the bare per-exit values, now on log-loss so they do not collapse),
:func:`member_share_per_exit` (paper Fig. 11), :func:`train_test_gap`; exit stealing:
:func:`exit_stealing_metrics`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from mexit.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # replicates x samples per vectorised block (~32 MB of float64)


# ----------------------------------------------------------------------------------------------- inputs
def _membership_inputs(member: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(member)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise InputError(f"member and scores must be 1-D arrays of equal length, got shapes {y.shape} and {s.shape}")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise InputError("member must be boolean (or 0/1): members are the positive class")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise InputError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf value(s); fix the attack's output")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise InputError(f"need both members and non-members to score an attack, got {n_pos} members of {len(y)}")
    return y, s


# ------------------------------------------------------------------------------------ weighted ROC core
class _SortedROC:
    """One descending sort of the scores, reused by every (re)weighted ROC computation.

    With per-sample weights ``w`` (unit weights: the data itself; multinomial counts: a bootstrap
    replicate) every metric here is a function of the cumulative weighted true/false positives at
    the distinct score values, exactly as ``sklearn.metrics.roc_curve`` builds its curve.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        order = np.argsort(-s, kind="mergesort")
        self.order = order
        self.y = y[order]
        self.s = s[order]
        # index of the last sample of each group of tied scores (where the next score is different)
        self.group_end = np.r_[np.flatnonzero(np.diff(self.s) != 0), len(self.s) - 1]
        self.n_pos = int(y.sum())
        self.n_neg = len(y) - self.n_pos

    def rates(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), each (B, groups + 1) starting at (0, 0), for weights ``w`` (B, n) in sorted order."""
        tp = np.cumsum(w * self.y, axis=1)[:, self.group_end]
        fp = np.cumsum(w * ~self.y, axis=1)[:, self.group_end]
        zeros = np.zeros((w.shape[0], 1))
        return (np.hstack([zeros, fp]) / fp[:, -1:], np.hstack([zeros, tp]) / tp[:, -1:])

    def metrics(self, w: np.ndarray, threshold: float, fprs: Sequence[float], method: str) -> dict[str, np.ndarray]:
        fpr, tpr = self.rates(w)
        out: dict[str, np.ndarray] = {"auc": np.trapezoid(tpr, fpr, axis=1)}
        # balanced accuracy at the fixed threshold: the first k sorted samples are predicted members
        k = int(np.searchsorted(-self.s, -threshold, side="right"))
        if k == 0:
            tp_rate = fp_rate = np.zeros(w.shape[0])
        else:
            tp_rate = (w[:, :k] * self.y[:k]).sum(axis=1) / (w * self.y).sum(axis=1)
            fp_rate = (w[:, :k] * ~self.y[:k]).sum(axis=1) / (w * ~self.y).sum(axis=1)
        out["balanced_accuracy"] = (tp_rate + 1.0 - fp_rate) / 2.0
        out["balanced_accuracy_best"] = ((tpr - fpr + 1.0) / 2.0).max(axis=1)
        for target in fprs:
            out[f"tpr@{target:g}"] = _tpr_at(fpr, tpr, target, method)
        return out


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float, method: str) -> np.ndarray:
    """TPR at FPR ``target`` per row of ROC arrays (B, m) whose rows start at (0, 0) and increase."""
    if method == "lira":
        return np.where(fpr < target, tpr, 0.0).max(axis=1)  # tpr is non-decreasing: the last point below
    if method == "interp":
        return np.array([np.interp(target, f, t) for f, t in zip(fpr, tpr, strict=True)])
    raise InputError(f"method must be 'lira' or 'interp', got {method!r}")


def _stratified_weights(rng: np.random.Generator, y_sorted: np.ndarray, replicates: int) -> np.ndarray:
    """Bootstrap multiplicities (replicates, n): members and non-members resampled separately."""
    w = np.empty((replicates, len(y_sorted)))
    for cls in (True, False):
        idx = np.flatnonzero(y_sorted == cls)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=replicates)
    return w


# ----------------------------------------------------------------------------------------- public API
def best_threshold(member: np.ndarray, scores: np.ndarray) -> float:
    """The decision threshold (``score >= t`` → member) maximising balanced accuracy on these data.

    Meant for *shadow* data; the returned value lies midway between two adjacent distinct scores, so
    it classifies the shadow samples exactly as the optimum does while leaving a margin either side.
    """
    y, s = _membership_inputs(member, scores)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if best == 0:  # predicting nobody a member is optimal (a useless attack): any t above the maximum
        return float(np.nextafter(s.max(), np.inf))
    distinct = np.unique(s)  # ascending
    t = thresholds[best]
    below = distinct[distinct < t]
    return float((t + below[-1]) / 2) if len(below) else float(t)


def tpr_at_fpr(member: np.ndarray, scores: np.ndarray, fpr: float, *,
               method: Literal["lira", "interp"] = "lira") -> float:
    """TPR at false-positive rate ``fpr`` (see the module docstring for the two conventions).

    ``method="lira"`` (default) is the step rule, no interpolation: the TPR of the best deterministic
    threshold whose FPR is strictly below ``fpr``. ``method="interp"`` interpolates linearly between the
    ROC points around ``fpr``. The ROC keeps every distinct score (``drop_intermediate=False``): with
    ``True`` scikit-learn drops collinear points, and the "last point below" of the step rule moved
    (it disagreed with :func:`attack_metrics` for tied scores).
    """
    y, s = _membership_inputs(member, scores)
    f, t, _ = roc_curve(y, s, drop_intermediate=False)
    return float(_tpr_at(f[None], t[None], fpr, method)[0])


def roc_points(member: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """ROC curve for plotting: ``fpr``, ``tpr``, ``thresholds`` from ``sklearn.metrics.roc_curve``.

    For a log-log plot, clip FPR at ``fpr_floor`` (one non-member, the resolution limit), returned too.
    """
    y, s = _membership_inputs(member, scores)
    fpr, tpr, thresholds = roc_curve(y, s)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "fpr_floor": np.float64(1.0 / int((~y).sum()))}


def attack_metrics(
    member: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    fprs: Sequence[float] = DEFAULT_FPRS,
    tpr_method: Literal["lira", "interp"] = "lira",
) -> dict[str, Any]:
    """AUC, balanced accuracy (ASR), best-threshold balanced accuracy and TPR at ``fprs``, with CIs.

    ``scores``: higher means "more likely a member". ``threshold``: the decision threshold chosen on
    shadow data (:func:`best_threshold`); ``None`` uses 0.5 and requires scores in [0, 1]. Each metric is
    ``{"value": v, "ci": [low, high]}`` (``ci`` is ``None`` when ``n_bootstrap == 0``). The point values
    equal scikit-learn's ``roc_auc_score`` / ``balanced_accuracy_score`` (AUC via the trapezoid on the
    full ROC, which is what ``roc_auc_score`` computes).
    """
    y, s = _membership_inputs(member, scores)
    if not 0 < ci < 1:
        raise InputError(f"ci must lie in (0, 1), got {ci}")
    if n_bootstrap < 0:
        raise InputError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if threshold is None:
        if s.min() < 0 or s.max() > 1:
            raise InputError("scores are not probabilities (outside [0, 1]) and no threshold was given; choose one "
                             "on shadow data with mexit.attacks.metrics.best_threshold and pass threshold=")
        threshold, source = 0.5, "default-0.5"
    else:
        threshold, source = float(threshold), "given"
    fprs = tuple(float(f) for f in fprs)
    if any(not 0 < f < 1 for f in fprs):
        raise InputError(f"fprs must lie in (0, 1), got {fprs}")

    roc = _SortedROC(y, s)
    point = {k: float(v[0]) for k, v in roc.metrics(np.ones((1, len(y))), threshold, fprs, tpr_method).items()}
    # scikit-learn computes the headline values; the weighted core must agree (it is what the bootstrap uses)
    point["auc"] = float(roc_auc_score(y, s))
    point["balanced_accuracy"] = float(balanced_accuracy_score(y, s >= threshold))

    intervals: dict[str, list[float] | None] = dict.fromkeys(point)
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // len(y))
        reps: dict[str, list[np.ndarray]] = {k: [] for k in point}
        for start in range(0, n_bootstrap, chunk):
            w = _stratified_weights(rng, roc.y, min(chunk, n_bootstrap - start))
            for k, v in roc.metrics(w, threshold, fprs, tpr_method).items():
                reps[k].append(v)
        alpha = (1 - ci) / 2
        for k, parts in reps.items():
            lo, hi = np.quantile(np.concatenate(parts), [alpha, 1 - alpha])
            intervals[k] = [float(lo), float(hi)]

    warnings = [f"only {roc.n_neg} non-members: TPR at FPR {f:g} rests on fewer than 10 false positives"
                for f in fprs if roc.n_neg < 10 / f]
    result: dict[str, Any] = {
        "n": len(y),
        "n_members": roc.n_pos,
        "n_nonmembers": roc.n_neg,
        "threshold": threshold,
        "threshold_source": source,
        "auc": {"value": point["auc"], "ci": intervals["auc"]},
        "balanced_accuracy": {"value": point["balanced_accuracy"], "ci": intervals["balanced_accuracy"]},
        "balanced_accuracy_best": {"value": point["balanced_accuracy_best"],
                                   "ci": intervals["balanced_accuracy_best"]},
        "tpr_at_fpr": {f"{f:g}": {"value": point[f"tpr@{f:g}"], "ci": intervals[f"tpr@{f:g}"]} for f in fprs},
        "tpr_method": tpr_method,
        "bootstrap": {"replicates": n_bootstrap, "seed": seed, "ci": ci, "method": "percentile, stratified"},
        "warnings": warnings,
    }
    return result


def clopper_pearson(k: int, n: int, ci: float = 0.95) -> list[float]:
    """Exact (Clopper–Pearson) interval of a binomial proportion ``k / n`` (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= k <= n:
        raise InputError(f"need 0 <= k <= n and n >= 1 for a proportion interval, got k={k}, n={n}")
    iv = binomtest(int(k), int(n)).proportion_ci(confidence_level=ci, method="exact")
    return [float(iv.low), float(iv.high)]


def low_fpr_tpr(member: np.ndarray, scores: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS, *,
                ci: float = 0.95, min_false_positives: int = 10) -> dict[str, dict[str, Any]]:
    """TPR at each low FPR with a Clopper–Pearson interval, or "not measurable" when there are too few non-members.

    The threshold is the step rule of :func:`tpr_at_fpr` (best TPR whose empirical FPR is strictly below the
    target, no interpolation). An FPR ``f`` is *measurable* only with at least ``min_false_positives / f``
    non-members (so the threshold rests on at least that many false positives); otherwise the entry says
    ``"not measurable: needs >= N non-members"`` and gives no value — at 0.1 % FPR with 150 non-members the
    number would be the TPR at zero false positives. The interval is exact for the TPR *at that threshold*
    (members are binomial given the threshold); it does not include the threshold's own uncertainty, which
    ``achieved_fpr``'s interval shows. JSON-ready, keyed by ``f"{f:g}"``.
    """
    y, s = _membership_inputs(member, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    f, t, thr = roc_curve(y, s, drop_intermediate=False)
    out: dict[str, dict[str, Any]] = {}
    for target in fprs:
        if not 0 < target < 1:
            raise InputError(f"fprs must lie in (0, 1), got {target}")
        needs = math.ceil(min_false_positives / target - 1e-9)
        row: dict[str, Any] = {"fpr": float(target), "n_members": n_pos, "n_nonmembers": n_neg,
                               "needs_nonmembers": needs, "method": "step rule (no interpolation), Clopper-Pearson",
                               "measurable": n_neg >= needs}
        if n_neg < needs:
            row.update(value=None, ci=None, note=f"not measurable: needs >= {needs} non-members, has {n_neg}")
        else:
            below = np.flatnonzero(f < target)
            best = int(below[np.argmax(t[below])])
            tp, fp = round(t[best] * n_pos), round(f[best] * n_neg)
            row.update(value=float(t[best]), ci=clopper_pearson(tp, n_pos, ci), threshold=float(thr[best]),
                       achieved_fpr=float(f[best]), achieved_fpr_ci=clopper_pearson(fp, n_neg, ci), note=None)
        out[f"{target:g}"] = row
    return out


def paired_bootstrap(member: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *,
                     fprs: Sequence[float] = DEFAULT_FPRS, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95,
                     tpr_method: Literal["lira", "interp"] = "lira") -> dict[str, dict[str, Any]]:
    """Paired bootstrap of ``b - a`` for AUC and TPR at ``fprs``: two attacks' scores on the **same** samples.

    Each replicate resamples the samples once (stratified: members and non-members separately) and scores
    both attacks on that resample, so the interval of the difference accounts for the correlation between
    them; two unpaired intervals that overlap say nothing about the difference. Per metric: ``a``, ``b``,
    ``difference``, its percentile ``ci``, a two-sided bootstrap ``p_value`` (twice the share of replicate
    differences on the other side of 0) and ``significant`` (the interval excludes 0).
    """
    y, sa = _membership_inputs(member, scores_a)
    _, sb = _membership_inputs(member, scores_b)
    if n_bootstrap < 1:
        raise InputError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < ci < 1:
        raise InputError(f"ci must lie in (0, 1), got {ci}")
    fprs = tuple(float(f) for f in fprs)
    roc_a, roc_b = _SortedROC(y, sa), _SortedROC(y, sb)

    def metrics(roc: _SortedROC, w: np.ndarray) -> dict[str, np.ndarray]:
        fpr, tpr = roc.rates(w[:, roc.order])
        out = {"auc": np.trapezoid(tpr, fpr, axis=1)}
        out.update({f"tpr@{f:g}": _tpr_at(fpr, tpr, f, tpr_method) for f in fprs})
        return out

    ones = np.ones((1, len(y)))
    point_a, point_b = metrics(roc_a, ones), metrics(roc_b, ones)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // len(y))
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in point_a}
    for start in range(0, n_bootstrap, chunk):
        w = _stratified_weights(rng, y, min(chunk, n_bootstrap - start))
        ma, mb = metrics(roc_a, w), metrics(roc_b, w)
        for k in diffs:
            diffs[k].append(mb[k] - ma[k])
    alpha = (1 - ci) / 2
    result: dict[str, dict[str, Any]] = {}
    for k, parts in diffs.items():
        d = np.concatenate(parts)
        lo, hi = np.quantile(d, [alpha, 1 - alpha])
        diff = float(point_b[k][0] - point_a[k][0])
        p = 2 * min(float((d <= 0).mean()), float((d >= 0).mean()))
        result[k] = {"a": float(point_a[k][0]), "b": float(point_b[k][0]), "difference": diff,
                     "ci": [float(lo), float(hi)], "p_value": min(1.0, p), "significant": bool(lo > 0 or hi < 0)}
    result["bootstrap"] = {"replicates": n_bootstrap, "seed": seed, "ci": ci, "method": "paired, stratified",
                           "difference": "b - a"}
    return result


#: What an AUC interval entirely below 0.5 means for a shadow-fitted attack.
INVERTED_MEANING = ("the rule fitted on the shadow ranks this target's members below its non-members, so it does not "
                    "transfer from shadow to target; neither leakage shown nor protection (an attacker without "
                    "labelled target members cannot know to flip it)")


def interval_side(ci: list[float] | tuple[float, float], reference: float) -> str:
    """Where an interval lies against a reference value: ``"above"``, ``"below"`` or ``"includes"``."""
    lo, hi = ci
    return "above" if lo > reference else "below" if hi < reference else "includes"


def significance_statement(metrics: dict[str, Any]) -> str:
    """One sentence saying whether an :func:`attack_metrics` result shows leakage (its AUC interval vs 0.5)."""
    auc = metrics["auc"]
    if auc.get("ci") is None:
        return f"AUC {auc['value']:.3f} has no interval (no bootstrap): significance unknown"
    lo, hi = auc["ci"]
    text = f"AUC {auc['value']:.3f} [{lo:.3f}, {hi:.3f}]"
    side = interval_side(auc["ci"], 0.5)
    if side == "includes":
        return f"no significant leakage: {text} includes 0.5"
    if side == "above":
        return f"significant: {text} lies above 0.5"
    return f"inverted: {text} lies below 0.5 — {INVERTED_MEANING}"


def exit_balanced_accuracy(true_exit: np.ndarray, pred_exit: np.ndarray) -> float:
    """Balanced accuracy of stolen exits: the mean recall over the exits the samples really took (chance: 1/K for
    K exits in use), scikit-learn's ``balanced_accuracy_score``.

    A stealer may name an exit that none of these samples took (a rare exit seen in calibration, a defended
    release that looks like a deeper exit); that exit has no recall to average, which is the definition wanted
    here, so scikit-learn's "y_pred contains classes not in y_true" warning is expected and not shown (an audit
    printed dozens of them).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        return float(balanced_accuracy_score(np.asarray(true_exit), np.asarray(pred_exit)))


def exit_stealing_metrics(true_exit: np.ndarray, pred_exit: np.ndarray, num_exits: int) -> dict[str, Any]:
    """Accuracy, confusion matrix (rows: true exit, columns: predicted) and per-exit recall of stolen exits.

    Predicted indices beyond ``num_exits - 1`` (an unsupervised stealer that found extra clusters) widen
    the matrix instead of being dropped. Recall is ``None`` for exits no sample took. JSON-ready.
    """
    t = np.asarray(true_exit, dtype=np.int64)
    p = np.asarray(pred_exit, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1 or not len(t):
        raise InputError(f"true_exit and pred_exit must be non-empty 1-D arrays of equal length, got {t.shape}, "
                         f"{p.shape}")
    if t.min() < 0 or t.max() >= num_exits or p.min() < 0:
        raise InputError(f"exit indices must be >= 0 (true exits < num_exits={num_exits})")
    k = max(num_exits, int(p.max()) + 1)
    cm = confusion_matrix(t, p, labels=np.arange(k))
    support = cm.sum(axis=1)
    recall = [None if support[i] == 0 else float(cm[i, i] / support[i]) for i in range(num_exits)]
    return {
        "n": len(t),
        "accuracy": float((t == p).mean()),
        "confusion_matrix": cm.tolist(),
        "per_exit_recall": recall,
        "true_exits_used": int(np.unique(t).size),
        "predicted_exits_used": int(np.unique(p).size),
    }


def js_divergence(a: np.ndarray, b: np.ndarray, bins: int | np.ndarray = 50,
                  value_range: tuple[float, float] | None = None) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) between the histograms of samples ``a`` and ``b``.

    Both histograms use the same bins (``bins`` edges, or that many equal bins over ``value_range``,
    default the pooled range). scipy's ``jensenshannon`` returns the JS *distance*; the divergence is its
    square. NaN when either sample is empty.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan
    if np.ndim(bins) == 0:
        pooled = np.concatenate([a, b])
        edges = np.histogram_bin_edges(pooled, bins=int(bins), range=value_range)
    else:
        edges = np.asarray(bins, dtype=np.float64)
    lo, hi = edges[0], edges[-1]
    pa, _ = np.histogram(np.clip(a, lo, hi), bins=edges)  # values outside the edges count in the end bins
    pb, _ = np.histogram(np.clip(b, lo, hi), bins=edges)
    return float(jensenshannon(pa, pb, base=2) ** 2)


LOG_LOSS_FLOOR = 1e-6  # losses below this (float32 round-off of p = 1) are one value on the log scale


def log_loss(loss: np.ndarray) -> np.ndarray:
    """``log(max(loss, 1e-6))``: members' losses of 1e-4 and non-members' of 1e-2 differ by a lot on this scale.

    Cross-entropies span [0, ~9] with most members within 1e-3 of 0, so linear bins over the raw range put
    them all in the first bin and the JS divergence collapses to 0 (issue 11); the log scale spreads them.
    """
    return np.log(np.maximum(np.asarray(loss, dtype=np.float64), LOG_LOSS_FLOOR))


def _per_exit_inputs(loss: np.ndarray, member: np.ndarray, exit_index: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(loss float64, member bool, exit int64)``, checked to be 1-D of one length."""
    loss = np.asarray(loss, dtype=np.float64)
    m = np.asarray(member).astype(bool)
    e = np.asarray(exit_index, dtype=np.int64)
    if not (loss.shape == m.shape == e.shape) or loss.ndim != 1:
        raise InputError(f"loss, member and exit_index must be 1-D of equal length, got {loss.shape}, {m.shape}, "
                         f"{e.shape}")
    return loss, m, e


def js_divergence_per_exit(loss: np.ndarray, member: np.ndarray, exit_index: np.ndarray, num_exits: int,
                           bins: int | np.ndarray = 50) -> np.ndarray:
    """JS divergence of member vs non-member **log-loss** per exit (paper Fig. 9), shape (num_exits,).

    The bins (``bins`` equal bins over the pooled log-loss, or explicit edges on the log scale) are common to
    all exits, so values are comparable across exits. NaN for an exit without members or without
    non-members. A bare value depends on the per-exit sample counts (a finite-sample histogram JS is biased
    upwards): report :func:`per_exit_js`, which adds a permutation baseline and a minimum count.
    """
    loss, m, e = _per_exit_inputs(loss, member, exit_index)
    v = log_loss(loss)
    edges = np.histogram_bin_edges(v, bins=bins) if np.ndim(bins) == 0 else np.asarray(bins, dtype=np.float64)
    return np.array([js_divergence(v[(e == k) & m], v[(e == k) & ~m], edges) for k in range(num_exits)])


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence (base 2) between the count histograms in the rows of ``p`` and ``q`` (B, bins)."""
    return jensenshannon(p, q, base=2, axis=1) ** 2


def per_exit_js(loss: np.ndarray, member: np.ndarray, exit_index: np.ndarray, num_exits: int, *,
                bins: int = 10, min_count: int = 20, n_permutations: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Per-exit member vs non-member divergence of the loss, each with its count and a permutation baseline.

    Estimator: JS divergence (base 2) between the histograms of members' and non-members' log-loss in
    ``bins`` equal-mass bins of that exit's pooled log-losses. Equal-mass bins make the value depend only on
    the ranks (no collapse whatever the scale of the losses). A histogram JS of two samples of the *same*
    distribution is not 0 (about ``(bins - 1) / (2 n ln 2)``-sized), so each exit also gets the
    distribution of the same statistic with member/non-member labels shuffled within the exit
    (``n_permutations``, seeded): ``baseline_mean``, ``baseline_q95`` and the permutation ``p_value``;
    ``excess = js - baseline_mean``. An exit with fewer than ``min_count`` members or non-members gets
    ``js = None`` and a note: its divergence is not reported. JSON-ready list, one dict per exit.
    """
    loss, m, e = _per_exit_inputs(loss, member, exit_index)
    if bins < 2 or min_count < 1 or n_permutations < 1:
        raise InputError(f"need bins >= 2, min_count >= 1 and n_permutations >= 1, got {bins}, {min_count}, "
                         f"{n_permutations}")
    rng = np.random.default_rng(seed)
    v = log_loss(loss)
    out: list[dict[str, Any]] = []
    for k in range(num_exits):
        sel = e == k
        lab = m[sel]
        n_mem, n_non = int(lab.sum()), int((~lab).sum())
        row: dict[str, Any] = {"exit": k, "n_members": n_mem, "n_nonmembers": n_non, "js": None,
                               "baseline_mean": None, "baseline_q95": None, "p_value": None, "excess": None,
                               "estimator": f"JS (base 2) of log-loss in {bins} equal-mass bins", "note": None}
        if min(n_mem, n_non) < min_count:
            row["note"] = (f"not reported: {n_mem} members and {n_non} non-members left here "
                           f"(needs >= {min_count} of each)")
            out.append(row)
            continue
        x = v[sel]
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
        idx = np.searchsorted(edges[1:-1], x, side="right")  # bin of each sample; ties stay together
        onehot = np.eye(max(len(edges) - 1, 1))[idx]  # (n, bins)
        total = onehot.sum(axis=0)
        labels = np.vstack([lab, rng.permuted(np.tile(lab, (n_permutations, 1)), axis=1)]).astype(np.float64)
        mem_counts = labels @ onehot  # (1 + P, bins): row 0 observed, the rest shuffled within this exit
        js = _js_rows(mem_counts, total - mem_counts)
        obs, null = float(js[0]), js[1:]
        row.update(js=obs, baseline_mean=float(null.mean()), baseline_q95=float(np.quantile(null, 0.95)),
                   p_value=float((1 + (null >= obs - 1e-12).sum()) / (1 + n_permutations)),
                   excess=float(obs - null.mean()))
        out.append(row)
    return out


def member_share_per_exit(member: np.ndarray, exit_index: np.ndarray, num_exits: int) -> dict[str, np.ndarray]:
    """Per exit: member and non-member counts and the share of members among samples leaving there.

    ``member_share[k]`` is NaN when no sample left at exit ``k``. (The paper's Fig. 11 plots the
    non-member share, ``1 - member_share``.)
    """
    m = np.asarray(member).astype(bool)
    e = np.asarray(exit_index, dtype=np.int64)
    if m.shape != e.shape or m.ndim != 1:
        raise InputError(f"member and exit_index must be 1-D of equal length, got {m.shape} and {e.shape}")
    if len(e) and (e.min() < 0 or e.max() >= num_exits):
        raise InputError(f"exit_index values must lie in 0..{num_exits - 1}")
    members = np.bincount(e[m], minlength=num_exits)
    nonmembers = np.bincount(e[~m], minlength=num_exits)
    total = members + nonmembers
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, members / np.maximum(total, 1), np.nan)
    return {"members": members, "nonmembers": nonmembers, "member_share": share}


def train_test_gap(train_acc: float, test_acc: float) -> float:
    """The classic overfitting level: training accuracy minus test accuracy (paper Fig. 3)."""
    for name, v in (("train_acc", train_acc), ("test_acc", test_acc)):
        if not 0.0 <= float(v) <= 1.0:
            raise InputError(f"{name} must be an accuracy in [0, 1], got {v}")
    return float(train_acc) - float(test_acc)
