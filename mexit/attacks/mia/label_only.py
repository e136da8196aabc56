"""Label-only membership inference: measuring robustness by querying, and thresholding it.

Collection (``Signals.label_only_score``) queries any label oracle — an object with the client interface
``infer(x) -> result`` whose ``result.outputs["label"]`` holds the predicted labels (:class:`OIPClient`,
:class:`LocalClient`, a guarded deployment...):

* ``kind="tabular"`` (binary features, Choquette-Choo et al.; reference §5.5): for each correctly
  classified sample, ``n_noisy`` copies with every feature flipped independently with probability ``p``;
  the score is the fraction of copies still given the true label (0 for misclassified samples). The
  copies are sent in large batches: the runtime decides exits per sample, so (unlike the reference,
  where sample 0 decided the exit of a whole batch) batching does not change any answer. ``p`` is chosen
  on the **shadow** deployment from ``{1, 2, 3, 5, 10} / d`` by :func:`choose_flip_probability`.
* ``kind="image"`` (any continuous input in ``clip_values``): the L2 distance to the decision boundary
  found by HopSkipJump (untargeted, L2) from IBM ART, through a ``BlackBoxClassifier`` that sees labels
  only; 0 for misclassified samples. Initial adversarial points are drawn from a seeded generator
  (batched) and ART's internal NumPy draws are seeded, so distances are reproducible. A sample for which
  no adversarial starting point is found within ``init_size`` random draws gets the largest possible
  distance (the diagonal of the input box): it is at least that robust.

Attacks: ``label-only`` thresholds the score (threshold chosen on shadow); ``label-only-hybrid`` gives
each observed exit its own threshold (paper §4.3), via :class:`ExitCalibration`; an exit with too few
shadow samples uses the global threshold. Nothing is ever averaged over exits here, so an exit without
target samples simply has none (the reference counted such exits as perfect).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mexit.attacks.mia.registry import register
from mexit.attacks.mia.threshold import ValueThresholdAttack
from mexit.attacks.signals import Signals
from mexit.errors import ConfigError, InputError, UserError

logger = logging.getLogger(__name__)

FLIP_GRID = (1, 2, 3, 5, 10)


class LabelOracle(Protocol):
    """Anything with the client interface: ``infer(x).outputs["label"]`` are the predicted labels."""

    def infer(self, x: np.ndarray) -> Any: ...


def query_labels(client: LabelOracle, x: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    """Predicted labels of ``x`` from the oracle, ``batch_size`` rows per request."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), batch_size):
        result = client.infer(x[start:start + batch_size])
        outputs = getattr(result, "outputs", None)
        if not isinstance(outputs, dict) or "label" not in outputs:
            raise UserError("the label oracle returned no 'label' output; query a client of a mexit or Open "
                            "Inference Protocol deployment (infer(x).outputs['label'])")
        labels = np.asarray(outputs["label"]).reshape(-1)
        if len(labels) != len(x[start:start + batch_size]):
            raise UserError(f"the label oracle answered {len(labels)} labels for {len(x[start:start + batch_size])} "
                            f"inputs")
        out[start:start + batch_size] = labels
    return out


# ------------------------------------------------------------------------------------ tabular: flips
def _check_binary(x: np.ndarray) -> None:
    if not np.isin(x, (0.0, 1.0)).all():
        raise InputError("random-flip robustness needs binary (0/1) features; for continuous inputs use "
                         "kind='image' (decision-boundary distance, any input inside clip_values)")


def flip_robustness(
    client: LabelOracle,
    x: np.ndarray,
    y: np.ndarray,
    *,
    flip_probability: float,
    n_noisy: int = 1000,
    batch_size: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Per sample, the fraction of ``n_noisy`` random-flip copies still given the true label (0 if misclassified).

    Copies of several samples share a request (``batch_size`` rows per request); noise is drawn from
    ``numpy.random.default_rng(seed)``.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} rows but y has {len(y)} labels")
    if not 0.0 < flip_probability <= 0.5:
        raise ConfigError(f"flip_probability must lie in (0, 0.5], got {flip_probability}")
    if n_noisy < 1 or batch_size < 1:
        raise ConfigError(f"n_noisy and batch_size must be >= 1, got {n_noisy} and {batch_size}")
    _check_binary(x)
    rng = np.random.default_rng(seed)
    scores = np.zeros(len(x), dtype=np.float32)
    correct = np.flatnonzero(query_labels(client, x, batch_size=batch_size) == y)
    group = max(1, batch_size // n_noisy)
    for start in range(0, len(correct), group):
        idx = correct[start:start + group]
        copies = np.repeat(x[idx], n_noisy, axis=0)
        flips = rng.random(copies.shape) < flip_probability
        noisy = np.where(flips, 1.0 - copies, copies).astype(np.float32)
        labels = query_labels(client, noisy, batch_size=batch_size).reshape(len(idx), n_noisy)
        scores[idx] = (labels == y[idx, None]).mean(axis=1)
    return scores


@dataclass(frozen=True)
class FlipChoice:
    """The flip probability chosen on shadow data, the shadow AUC of every candidate, and its shadow scores."""

    flip_probability: float
    auc_by_probability: dict[float, float]
    shadow_scores: np.ndarray = field(repr=False)


def choose_flip_probability(
    shadow_client: LabelOracle,
    x: np.ndarray,
    y: np.ndarray,
    member: np.ndarray,
    *,
    grid: Sequence[int] = FLIP_GRID,
    n_noisy: int = 1000,
    batch_size: int = 1000,
    seed: int = 0,
) -> FlipChoice:
    """Pick ``p = k / d`` (``k`` in ``grid``) maximising the membership AUC on the adversary's **shadow** model.

    The reference picked ``p`` (and the threshold) on the target; here only shadow members/non-members
    are used. Ties go to the smallest ``p``.
    """
    from sklearn.metrics import roc_auc_score

    member = np.asarray(member, dtype=bool)
    if member.all() or not member.any():
        raise UserError("choosing the flip probability needs shadow members and non-members")
    d = int(np.prod(np.shape(x)[1:]))
    best: tuple[float, float, np.ndarray] | None = None
    aucs: dict[float, float] = {}
    for k in sorted(grid):
        p = min(k / d, 0.5)
        if p in aucs:
            continue
        scores = flip_robustness(shadow_client, x, y, flip_probability=p, n_noisy=n_noisy, batch_size=batch_size,
                                 seed=seed)
        aucs[p] = float(roc_auc_score(member, scores))
        if best is None or aucs[p] > best[1]:
            best = (p, aucs[p], scores)
    assert best is not None
    logger.info("flip probability %.4g chosen on shadow data (AUC %.4f; all: %s)", best[0], best[1], aucs)
    return FlipChoice(best[0], aucs, best[2])


# ---------------------------------------------------------------------------- images: HopSkipJump
def boundary_distances(
    client: LabelOracle,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    max_iter: int = 10,
    max_eval: int = 10000,
    init_eval: int = 100,
    init_size: int = 100,
    batch_size: int = 128,
    clip_values: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """L2 distance from each correctly classified sample to the oracle's decision boundary (HopSkipJump).

    Defaults are the reference's (``max_iter`` 10 and ART's ``max_eval``/``init_eval``/``init_size``);
    lower them for a CPU budget. Misclassified samples score 0; see the module docstring for failures.
    """
    try:
        from art.attacks.evasion import HopSkipJump
        from art.estimators.classification import BlackBoxClassifier
    except ImportError:
        raise UserError("decision-boundary label-only scores need IBM ART: pip install "
                        "adversarial-robustness-toolbox") from None
    from tqdm import tqdm

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} rows but y has {len(y)} labels")
    lo, hi = float(clip_values[0]), float(clip_values[1])
    if not lo < hi:
        raise ConfigError(f"clip_values must be (min, max) with min < max, got {clip_values}")
    if len(x) and (x.min() < lo or x.max() > hi):
        raise InputError(f"inputs must lie inside clip_values {clip_values}, got values in [{x.min()}, {x.max()}]")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), got {int(y.max())}")
    eye = np.eye(num_classes, dtype=np.float32)

    def labels_of(batch: np.ndarray) -> np.ndarray:
        labels = query_labels(client, batch, batch_size=batch_size)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"the oracle returned label {int(labels.max())}, outside 0..{num_classes - 1}; "
                            f"is num_classes right?")
        return labels

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        return eye[labels_of(batch)]

    distances = np.zeros(len(x), dtype=np.float32)
    if len(x) == 0:
        return distances
    diagonal = float((hi - lo) * np.sqrt(np.prod(x.shape[1:])))
    correct = np.flatnonzero(labels_of(x) == y)
    rng = np.random.default_rng(seed)

    # Seeded, batched search for initial adversarial points (ART's own search is unseeded and one query each).
    init = np.empty((len(correct), *x.shape[1:]), dtype=np.float32)
    found = np.zeros(len(correct), dtype=bool)
    for _ in range(init_size):
        todo = np.flatnonzero(~found)
        if not len(todo):
            break
        candidates = rng.uniform(lo, hi, size=(len(todo), *x.shape[1:])).astype(np.float32)
        hit = labels_of(candidates) != y[correct[todo]]
        init[todo[hit]] = candidates[hit]
        found[todo[hit]] = True
    distances[correct[~found]] = diagonal
    if (~found).any():
        logger.warning("no adversarial starting point for %d sample(s) in %d draws; their distance is the input "
                       "diagonal %.3g", int((~found).sum()), init_size, diagonal)

    classifier = BlackBoxClassifier(predict_fn, input_shape=tuple(x.shape[1:]), nb_classes=num_classes,
                                    clip_values=(lo, hi))
    attack = HopSkipJump(classifier, batch_size=batch_size, targeted=False, norm=2, max_iter=max_iter,
                         max_eval=max_eval, init_eval=init_eval, init_size=init_size, verbose=False)
    todo = correct[found]
    starts = init[found]
    state = np.random.get_state()
    np.random.seed(seed)  # ART draws its gradient-estimation noise from NumPy's global generator
    try:
        chunk = 16
        for start in tqdm(range(0, len(todo), chunk), desc="HopSkipJump", unit="chunk", disable=not progress):
            idx = todo[start:start + chunk]
            x_adv = attack.generate(x[idx], y=eye[y[idx]], x_adv_init=starts[start:start + chunk].copy())
            dist = np.linalg.norm((x_adv - x[idx]).reshape(len(idx), -1), axis=1)
            # ART hands back the original input when it gives up (NaN); the start point bounds the distance then
            start_dist = np.linalg.norm((starts[start:start + chunk] - x[idx]).reshape(len(idx), -1), axis=1)
            distances[idx] = np.where(labels_of(x_adv) == y[idx], start_dist, dist)
    finally:
        np.random.set_state(state)
    return distances


def collect_label_only_scores(
    client: LabelOracle,
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    *,
    seed: int = 0,
    **opts: Any,
) -> np.ndarray:
    """Label-only robustness per sample, for ``Signals.label_only_score`` (higher = more member-like).

    ``kind="tabular"``: :func:`flip_robustness` (needs ``flip_probability``, e.g. from
    :func:`choose_flip_probability` on the shadow deployment; options ``n_noisy``, ``batch_size``).
    ``kind="image"``: :func:`boundary_distances` (needs ``num_classes``; options ``max_iter``,
    ``max_eval``, ``init_eval``, ``init_size``, ``batch_size``, ``clip_values``, ``progress``).
    """
    if kind == "tabular":
        if "flip_probability" not in opts:
            raise ConfigError("tabular label-only scores need flip_probability; choose it on the shadow "
                              "deployment with choose_flip_probability()")
        return flip_robustness(client, x, y, seed=seed, **opts)
    if kind == "image":
        if "num_classes" not in opts:
            raise ConfigError("image label-only scores need num_classes (the oracle returns labels only)")
        return boundary_distances(client, x, y, seed=seed, **opts)
    raise ConfigError(f"label-only kind must be 'tabular' (binary features) or 'image' (continuous inputs), "
                      f"got {kind!r}")


# ------------------------------------------------------------------------------------------ attacks
@register
class LabelOnlyAttack(ValueThresholdAttack):
    """Threshold on the label-only robustness score (members are more robust), chosen on shadow data."""

    name = "label-only"
    requires = frozenset({"pred_label", "label_only_score"})
    description = "threshold on label-only robustness (flip stability or boundary distance)"

    def _value(self, signals: Signals) -> np.ndarray:
        return np.asarray(signals.label_only_score, dtype=np.float64)


@register
class LabelOnlyHybridAttack(LabelOnlyAttack):
    """Label-only robustness with one threshold per observed exit (paper §4.3)."""

    name = "label-only-hybrid"
    requires = frozenset({"pred_label", "label_only_score", "exit_index"})
    hybrid = True
    description = "label-only robustness with a threshold per observed exit"
