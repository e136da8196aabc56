"""Reference models for LiRA and RMIA: the reference-set manifest, and per-sample reference signals.

A *reference set* is R models of the target's architecture, exit count and training recipe, each trained
on a random half of a population pool, so that every pooled sample is IN (in the training set) of about
half of them. The manifest (``reference_set.json``) records, per model, its bundle and exactly which pool
samples it saw; :func:`reference_signals` queries every bundle through the early-exit runtime (the same
code path as the target, so exits are real) and returns the per-sample arrays that
:class:`~mexit.attacks.signals.Signals` carries for reference-model attacks:

* ``reference_score`` (n, R) float32: LiRA's logit-scaled confidence in the true class,
  ``log p_y - log sum_{y' != y} p_y'`` (:func:`logit_confidence`);
* ``reference_in`` (n, R) bool: the sample was in reference r's training set;
* ``reference_exit`` (n, R) int64: the exit reference r took.

One model also makes a reference set: the adversary's shadow model is OUT for every target query sample
(the splits are disjoint), so :func:`single_reference` turns its predictions on the target's samples into
a one-model set and offline LiRA/RMIA run in the default audit at no extra training cost.

Refusals, one line each (:class:`ReferenceError`): references of another architecture or exit count than
the target, a manifest whose models disagree, an index outside the pool, a population that overlaps the
target's members (:func:`check_population`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json
from mexit.attacks.signals import Signals, SignalsError

MANIFEST_FILE = "reference_set.json"
MANIFEST_SCHEMA = "mexit.reference_set/1"
_PROB_FLOOR = 1e-30  # float32 softmax underflows; keeps the log-odds finite (|score| <= ~69)


class ReferenceError(SignalsError):
    """A reference set is missing, inconsistent, or does not match the target it is used against."""


def logit_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic: ``log p_y - log sum_{y' != y} p_y'`` per sample, float32 (higher = more member-like).

    The sum over the other classes is taken directly (not ``1 - p_y``, which rounds to 0 for confident
    float32 outputs), both terms floored at 1e-30 so the value stays finite.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (len(p),):
        raise SignalsError(f"probs must be (n, classes) and labels (n,), got {p.shape} and {y.shape}")
    rows = np.arange(len(y))
    py = p[rows, y]
    masked = p.copy()
    masked[rows, y] = 0.0
    others = masked.sum(axis=1)
    return (np.log(np.maximum(py, _PROB_FLOOR)) - np.log(np.maximum(others, _PROB_FLOOR))).astype(np.float32)


def probability_from_logit(score: np.ndarray) -> np.ndarray:
    """The true-class probability back from :func:`logit_confidence` (``expit``), float64."""
    from scipy.special import expit

    return expit(np.asarray(score, dtype=np.float64))


@dataclass(frozen=True)
class ReferenceModel:
    """One reference model: its bundle (relative to the manifest's directory) and the pool samples it saw."""

    name: str
    bundle: str
    train_index: tuple[int, ...]
    seed: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceSet:
    """The manifest of a reference set: same architecture, exits and recipe for every model.

    ``pool``: dataset indices the halves were drawn from; ``recipe``: the training options shared by all
    models (epochs, lr, …) and ``recipe_digest`` their hash, which caches the set by configuration.
    """

    dataset: str
    arch: str
    num_exits: int
    num_classes: int
    pool: tuple[int, ...]
    recipe: dict[str, Any]
    recipe_digest: str
    models: tuple[ReferenceModel, ...]
    root: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ReferenceError("a reference set needs at least one model")
        pool = set(self.pool)
        for m in self.models:
            extra = set(m.train_index) - pool
            if extra:
                raise ReferenceError(f"reference model {m.name} trained on {len(extra)} samples outside the pool; "
                                     "the manifest is inconsistent: rebuild the reference set")

    def __len__(self) -> int:
        return len(self.models)

    def in_matrix(self, sample_index: np.ndarray) -> np.ndarray:
        """(n, R) bool: whether each dataset sample was in each model's training set."""
        idx = np.asarray(sample_index, dtype=np.int64)
        return np.stack([np.isin(idx, np.fromiter(m.train_index, dtype=np.int64)) for m in self.models], axis=1)

    def bundle_path(self, model: ReferenceModel) -> Path:
        base = self.root if self.root is not None else Path(".")
        return base / model.bundle

    def check_matches(self, *, arch: str | None, num_exits: int, num_classes: int | None = None,
                      dataset: str | None = None) -> None:
        """Refuse a reference set of another architecture, exit count, class count or dataset than the target."""
        if num_exits != self.num_exits:
            raise ReferenceError(f"reference models have {self.num_exits} exits but the target has {num_exits}; "
                                 "train references with the target's exits")
        if arch is not None and arch != self.arch:
            raise ReferenceError(f"reference models are {self.arch} but the target is {arch}; train references "
                                 "with the target's architecture")
        if num_classes is not None and num_classes != self.num_classes:
            raise ReferenceError(f"reference models have {self.num_classes} classes but the target has "
                                 f"{num_classes}")
        if dataset is not None and dataset != self.dataset:
            raise ReferenceError(f"reference models were trained on {self.dataset}, the target on {dataset}")

    # ------------------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d["schema"] = MANIFEST_SCHEMA
        d["pool"] = list(self.pool)
        d["models"] = [{**asdict(m), "train_index": list(m.train_index)} for m in self.models]
        return d

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceSet:
        directory = Path(directory)
        path = directory / MANIFEST_FILE if directory.is_dir() else directory
        if not path.is_file():
            raise ReferenceError(f"no reference set at {path}; train one with mexit.audit.reference.train_references")
        try:
            d = json.loads(path.read_text())
            if d.get("schema") != MANIFEST_SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
            models = tuple(ReferenceModel(name=m["name"], bundle=m["bundle"], train_index=tuple(m["train_index"]),
                                          seed=int(m["seed"]), metrics=m.get("metrics", {})) for m in d["models"])
            return cls(dataset=d["dataset"], arch=d["arch"], num_exits=int(d["num_exits"]),
                       num_classes=int(d["num_classes"]), pool=tuple(d["pool"]), recipe=d["recipe"],
                       recipe_digest=d["recipe_digest"], models=models, root=path.parent)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReferenceError(f"{path} is not a readable reference-set manifest ({exc}); rebuild it") from None


def half_splits(pool: Sequence[int] | np.ndarray, n_models: int, seed: int) -> list[np.ndarray]:
    """``n_models`` training sets, each a random half of ``pool``, balanced per sample (seeded).

    Models come in complementary pairs (as Privacy Meter 2 does): model 2k trains on a random half and
    model 2k+1 on the other half, so every pooled sample is IN for exactly half of an even number of models;
    with an odd count the last model takes a fresh random half.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if n_models < 1 or len(pool) < 2:
        raise ReferenceError(f"need >= 1 reference model and >= 2 pooled samples, got {n_models} and {len(pool)}")
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < n_models:
        perm = rng.permutation(pool)
        half = len(pool) // 2
        out.append(np.sort(perm[:half]))
        if len(out) < n_models:
            out.append(np.sort(perm[half:]))
    return out


def check_population(population_index: np.ndarray, target_member_index: np.ndarray) -> None:
    """Refuse RMIA population samples that are members of the target (its z-samples must be non-members)."""
    overlap = np.intersect1d(np.asarray(population_index, dtype=np.int64),
                             np.asarray(target_member_index, dtype=np.int64))
    if len(overlap):
        raise ReferenceError(f"the RMIA population overlaps the target's members in {len(overlap)} samples; draw "
                             "the population from data the target was not trained on")


def reference_signals(refs: ReferenceSet, x: np.ndarray, labels: np.ndarray, sample_index: np.ndarray, *,
                      backend: str = "onnxruntime", batch_size: int = 1024,
                      **backend_opts: Any) -> dict[str, np.ndarray]:
    """Query every reference bundle on ``x`` through the early-exit runtime; the three (n, R) reference arrays.

    Each bundle runs at its own deployed threshold (as the target does), so ``reference_exit`` holds the exits
    the references really take.
    """
    from mexit.runtime import EarlyExitRuntime

    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    scores = np.empty((n, len(refs)), dtype=np.float32)
    exits = np.empty((n, len(refs)), dtype=np.int64)
    for r, model in enumerate(refs.models):
        rt = EarlyExitRuntime(refs.bundle_path(model), backend=backend, **backend_opts)
        if rt.num_exits != refs.num_exits or rt.num_classes != refs.num_classes:
            raise ReferenceError(f"reference bundle {model.bundle} has {rt.num_exits} exits and {rt.num_classes} "
                                 f"classes, the manifest says {refs.num_exits} and {refs.num_classes}")
        for start in range(0, n, batch_size):
            pred = rt.predict(x[start:start + batch_size])
            scores[start:start + batch_size, r] = logit_confidence(pred.probs, labels[start:start + batch_size])
            exits[start:start + batch_size, r] = pred.exit_index
    return {"reference_score": scores, "reference_in": refs.in_matrix(sample_index), "reference_exit": exits}


def single_reference(probs: np.ndarray, labels: np.ndarray, exits: np.ndarray | None) -> dict[str, np.ndarray]:
    """One OUT reference (e.g. the shadow model queried on the target's samples) as the three (n, 1) arrays."""
    score = logit_confidence(probs, labels)[:, None]
    out = {"reference_score": score, "reference_in": np.zeros(score.shape, dtype=bool)}
    if exits is not None:
        out["reference_exit"] = np.asarray(exits, dtype=np.int64)[:, None]
    return out


def with_references(signals: Signals, arrays: dict[str, np.ndarray]) -> Signals:
    """A copy of ``signals`` carrying the reference arrays (rows in the same order as the signals' samples)."""
    n = len(signals)
    for name, arr in arrays.items():
        if arr.shape[0] != n:
            raise ReferenceError(f"{name} has {arr.shape[0]} rows but the signals hold {n} samples; query the "
                                 "references on the same samples, in the same order")
    return replace(signals, **arrays)


def paired_shadow(signals: Signals, r: int) -> Signals:
    """Signals in which reference model ``r`` plays the target and the other references its references.

    The adversary knows which samples each of its references trained on, so any reference is a "shadow"
    with known membership (Privacy Meter's paired model): fitting a reference attack on it needs no extra
    model, and with online references the shadow's own samples are IN for some references (the symmetric
    target-as-reference trick only gives OUT ones). Only the true-class log-odds of reference ``r`` is known,
    so ``probs`` put ``p = expit(score)`` on the true class and ``1 - p`` on one other class: the LiRA
    statistic and the RMIA probability are exact, other probability-based features are not (use this only
    for reference attacks). ``exit_index`` is the exit the reference took.
    """
    if signals.reference_score is None or signals.reference_in is None:
        raise ReferenceError("a paired shadow needs signals with reference arrays")
    n, big_r = signals.reference_score.shape
    if not 0 <= r < big_r or big_r < 2:
        raise ReferenceError(f"a paired shadow needs >= 2 references and 0 <= r < {big_r}, got r={r}")
    if signals.num_classes < 2:
        raise ReferenceError("a paired shadow needs at least 2 classes")
    p = probability_from_logit(signals.reference_score[:, r])
    y = np.asarray(signals.true_label, dtype=np.int64)
    rows = np.arange(n)
    probs = np.zeros((n, signals.num_classes), dtype=np.float64)
    probs[rows, y] = p
    probs[rows, (y + 1) % signals.num_classes] = 1.0 - p
    keep = np.arange(big_r) != r
    member = signals.reference_in[:, r].astype(bool)
    return Signals(member=member, true_label=y, pred_label=probs.argmax(axis=1).astype(np.int64),
                   sample_index=signals.sample_index, num_exits=signals.num_exits, num_classes=signals.num_classes,
                   probs=probs.astype(np.float32),
                   exit_index=None if signals.reference_exit is None else signals.reference_exit[:, r],
                   reference_score=signals.reference_score[:, keep], reference_in=signals.reference_in[:, keep],
                   reference_exit=None if signals.reference_exit is None else signals.reference_exit[:, keep],
                   meta={**signals.meta, "paired_reference": int(r)})


def reference_recorder(source: ReferenceSet | Mapping[str, Any], *, backend: str = "onnxruntime"
                       ) -> Callable[[Any], tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """A recorder for the attack flow (``mexit.attacks.flow.RECORDERS``) producing the three reference arrays.

    ``source`` is either a trained :class:`ReferenceSet` (every queried deployment gets the same references,
    queried on its samples) or a mapping ``role -> runtime`` of *single* OUT references: the default audit's
    free version, ``{"target": shadow_runtime, "shadow": target_runtime}`` (the shadow model did not train
    on the target's samples and vice versa). The recorder reads ``ctx.queries.x / .y / .index`` and
    ``ctx.role`` and returns ``(arrays, info)``.
    """

    def record(ctx: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        q = ctx.queries
        if isinstance(source, ReferenceSet):
            arrays = reference_signals(source, q.x, q.y, q.index, backend=backend)
            return arrays, {"references": len(source), "reference_digest": source.recipe_digest}
        if ctx.role not in source:
            raise ReferenceError(f"no single reference model for the {ctx.role} deployment; give one per role "
                                 f"(have {', '.join(sorted(source))})")
        pred = source[ctx.role].predict(q.x)
        return single_reference(pred.probs, q.y, pred.exit_index), {"references": 1, "reference": "single OUT model"}

    return record
