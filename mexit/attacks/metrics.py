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
  ``tpr[np.where(fpr < target)[0][-1]]`` on ``sklearn.metrics.roc_curve``: the best TPR of a
  deterministic threshold whose FPR is strictly below the target (a step function, not a linear
  interpolation between ROC points, which would describe a randomised classifier).
  ``method="interp"`` gives the interpolated value instead.
* Every number comes with a **bootstrap confidence interval**: percentile method, stratified
  (members and non-members are resampled separately, so every replicate keeps the class counts and
  the metrics stay defined), seeded. Replicates are computed with resampling *weights* on one sorted
  order (exact, vectorised), and the unit-weight case reproduces scikit-learn's values (tested).
  When there are too few non-members to resolve a target FPR (fewer than ``10 / fpr``) a
  ``warnings`` entry says so: the estimate rests on a handful of samples.

Leakage statistics: :func:`js_divergence_per_exit` (Jensen–Shannon divergence of member vs non-member
loss histograms per exit, the paper's §3.4 overfitting measure), :func:`member_share_per_exit`
(paper Fig. 11), :func:`train_test_gap`; exit stealing: :func:`exit_stealing_metrics`.
"""

from __future__ import annotations

import logging
import math
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
    """TPR at false-positive rate ``fpr`` (see the module docstring for the two conventions)."""
    y, s = _membership_inputs(member, scores)
    f, t, _ = roc_curve(y, s)
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


def js_divergence_per_exit(loss: np.ndarray, member: np.ndarray, exit_index: np.ndarray, num_exits: int,
                           bins: int | np.ndarray = 50) -> np.ndarray:
    """JS divergence of member vs non-member loss per exit (paper Fig. 9), shape (num_exits,).

    The bins are common to all exits (computed once over every loss), so values are comparable across
    exits. NaN for an exit without members or without non-members.
    """
    loss = np.asarray(loss, dtype=np.float64)
    m = np.asarray(member).astype(bool)
    e = np.asarray(exit_index, dtype=np.int64)
    if not (loss.shape == m.shape == e.shape) or loss.ndim != 1:
        raise InputError(f"loss, member and exit_index must be 1-D of equal length, got {loss.shape}, {m.shape}, "
                         f"{e.shape}")
    edges = np.histogram_bin_edges(loss, bins=bins) if np.ndim(bins) == 0 else np.asarray(bins, dtype=np.float64)
    return np.array([js_divergence(loss[(e == k) & m], loss[(e == k) & ~m], edges) for k in range(num_exits)])


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
