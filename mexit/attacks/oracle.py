"""The oracle exit stealer: an UPPER BOUND on stealing, not an attack anyone can run.

It trains class-balanced gradient-boosted trees (scikit-learn ``HistGradientBoostingClassifier`` with
``class_weight="balanced"``) on the *target's own* guarded timings **with the true exits**, and scores
them by stratified k-fold cross-validation. A real attacker has neither the target's true exits nor its
key; the shipped stealers (:mod:`mexit.attacks.stealing`) learn from a shadow deployment or cluster
blindly. The oracle exists to judge defenses: if even it stays near chance (``1/K`` in balanced
accuracy over the exits in use), no stealer that learns from timings will do better on this traffic; if
it does not, a defense that the shipped stealers "cannot break" still leaks (issue 12: padding to the
final exit's median fooled the shipped stealers, not the oracle).

Features per sample are robust summaries of its repeated queries: minimum, median, 20 % trimmed mean
and the two quartiles. Class balance matters because exit shares are skewed (one exit often takes
80 % of the traffic) and the judge is balanced accuracy, not accuracy against the majority share.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from mexit.attacks.metrics import exit_balanced_accuracy
from mexit.attacks.stealing import TRIM
from mexit.errors import InputError

LABEL = "oracle (upper bound: trained on the target's own guarded timings and true exits; no real attacker has them)"


def quantise(features: np.ndarray, levels: int = 128) -> np.ndarray:
    """Each column mapped to at most ``levels`` ordinal values at its (label-free) quantiles.

    The trees bin every feature anyway; handing them few distinct values skips HistGradientBoosting's
    sample-weighted percentile binning (``class_weight`` makes it weighted), 3x faster. Ties (many samples
    released at the same time) stay ties. Uses no labels, so it leaks nothing across folds.
    """
    x = np.asarray(features, dtype=np.float64)
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        col = x[:, j]
        edges = np.unique(np.quantile(col, np.linspace(0, 1, levels + 1)[1:-1]))
        out[:, j] = np.searchsorted(edges, col, side="right")
    return out


def oracle_features(latencies: np.ndarray) -> np.ndarray:
    """Per-sample (min, median, trimmed mean, 25 %, 75 % quantile) of ``(n,)`` or ``(n, repeats)`` latencies."""
    t = np.asarray(latencies, dtype=np.float64)
    t = t[:, None] if t.ndim == 1 else t
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0 or not np.all(np.isfinite(t)):
        raise InputError(f"latencies must be a finite, non-empty (n,) or (n, repeats) array, got shape {t.shape}")
    q25, q50, q75 = np.quantile(t, [0.25, 0.5, 0.75], axis=1)
    return np.column_stack([t.min(axis=1), q50, stats.trim_mean(t, TRIM, axis=1), q25, q75])


class OracleStealer:
    """Cross-validated, class-balanced gradient-boosted trees on the target's own timings and true exits."""

    label = LABEL

    def __init__(self, *, folds: int = 5, seed: int = 0, max_iter: int = 100, min_samples_leaf: int = 5) -> None:
        if folds < 2:
            raise InputError(f"the oracle needs at least 2 cross-validation folds, got {folds}")
        self.folds = int(folds)
        self.seed = int(seed)
        self.max_iter = int(max_iter)
        # Small leaves: an exit taken by 5 % of a few hundred samples must still get leaves of its own.
        self.min_samples_leaf = int(min_samples_leaf)

    def _model(self) -> HistGradientBoostingClassifier:
        return HistGradientBoostingClassifier(class_weight="balanced", max_iter=self.max_iter,
                                              min_samples_leaf=self.min_samples_leaf, random_state=self.seed)

    def cross_val_predict(self, latencies: np.ndarray, true_exits: np.ndarray) -> np.ndarray:
        """Out-of-fold exit predictions for every sample (each predicted by a model that never saw it).

        Exits taken by fewer samples than there are folds are predicted by folds that may not contain
        them; with a single exit in use there is nothing to learn and that exit is returned.
        """
        x = quantise(oracle_features(latencies))
        y = np.asarray(true_exits, dtype=np.int64)
        if y.shape != (x.shape[0],):
            raise InputError(f"true_exits must hold one exit per sample ({x.shape[0]}), got shape {y.shape}")
        classes, counts = np.unique(y, return_counts=True)
        if classes.size == 1:
            return y.copy()
        folds = int(min(self.folds, max(2, counts.max())))
        cv = StratifiedKFold(n_splits=min(folds, x.shape[0]), shuffle=True, random_state=self.seed)
        # One OpenMP thread: the trees are small, and on a shared machine HistGradientBoosting's thread pool
        # oversubscribes the cores (measured 30x slower on a loaded 2-core VM).
        with warnings.catch_warnings(), threadpool_limits(1, user_api="openmp"):
            # "least populated class has only m members": handled above
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            return np.asarray(cross_val_predict(self._model(), x, y, cv=cv), dtype=np.int64)

    def balanced_accuracy(self, latencies: np.ndarray, true_exits: np.ndarray) -> float:
        """Cross-validated balanced accuracy over the exits in use (chance: 1/K)."""
        y = np.asarray(true_exits, dtype=np.int64)
        return exit_balanced_accuracy(y, self.cross_val_predict(latencies, y))

    def fit_score(self, train_latencies: np.ndarray, train_exits: np.ndarray, test_latencies: np.ndarray,
                  test_exits: np.ndarray) -> float:
        """Balanced accuracy on held-out traffic after training on ``train_*`` (for comparing with the Bayes bound)."""
        y = np.asarray(train_exits, dtype=np.int64)
        if np.unique(y).size == 1:
            pred = np.full(len(test_exits), y[0])
        else:
            feats = quantise(np.vstack([oracle_features(train_latencies), oracle_features(test_latencies)]))
            with threadpool_limits(1, user_api="openmp"):
                model = self._model().fit(feats[: len(y)], y)
                pred = model.predict(feats[len(y):])
        return exit_balanced_accuracy(np.asarray(test_exits, dtype=np.int64), pred)
