"""``Signals``: what an attacker records about each queried sample, stored as one ``.npz`` file.

Attacks consume ``Signals``, never models, so an attack runs the same against a local runtime, a
remote server or a recorded file. Every array has one row per queried sample; optional arrays are
``None`` when the target does not expose them (e.g. ``probs`` behind a label-only server, ``exit_index``
unless the server exposes exits — the paper's Adversary 1).

Ground truth that the attacker does *not* observe (``member``, and ``true_exit`` for scoring exit
stealing) is stored beside the observations so that evaluation needs no other file; attacks must only
read what their adversary is allowed to (``observed_exit`` says what that is).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import load_npz, save_npz
from mexit.errors import UserError

SIGNALS_FORMAT = 1
_ARRAYS = ("member", "true_label", "pred_label", "probs", "loss", "exit_index", "true_exit", "latency_ns",
           "embedding", "gradient", "label_only_score", "sample_index", "reference_score", "reference_in",
           "reference_exit", "latency_drift_ns")
#: Per-sample, per-reference-model arrays (n, R): what R reference models returned for each queried sample.
REFERENCE_FIELDS = ("reference_score", "reference_in", "reference_exit")


class SignalsError(UserError):
    """A signals file is missing, corrupt, or does not match what it is combined with."""


@dataclass(frozen=True)
class Signals:
    """Per-sample observations of one target (or shadow) deployment.

    ``member`` (n,) bool: ground-truth membership (members are the positive class).
    ``true_label`` (n,) int64; ``pred_label`` (n,) int64: the label the target returned.
    ``probs`` (n, C) float32 or None: returned probabilities (score-based adversaries only).
    ``loss`` (n,) float32 or None: cross-entropy computed attacker-side from ``probs``.
    ``exit_index`` (n,) int64 or None: the exit the target *reported* (only when it exposes exits).
    ``true_exit`` (n,) int64 or None: the exit actually taken (evaluation only, never an attack input
    unless the adversary is allowed it).
    ``latency_ns`` (n, R) int64 or None: all R round-trip times per sample, in query order.
    ``latency_drift_ns`` (n, R) float64 or None: how much slower than usual the host answered at each of those
    queries, measured on the attacker's own shadow queried in between (:mod:`mexit.attacks.pacing`; paced
    adaptive querying only). :meth:`drift_corrected_latency_ns` subtracts it.
    ``embedding`` (n, E) float32 / ``gradient`` (n, G) float32 or None: white-box features of the taken exit.
    ``label_only_score`` (n,) float32 or None: a label-only attack's per-sample perturbation robustness
    (decision-boundary distance for images, random-flip stability for tabular rows), measured by querying.
    ``sample_index`` (n,) int64: indices into the dataset the samples came from.
    ``reference_score`` (n, R) float32 or None: each of R reference models' logit-scaled confidence in the
    true class, ``log p_y - log(1 - p_y)`` (LiRA's statistic), for reference-model attacks (LiRA, RMIA).
    ``reference_in`` (n, R) bool: whether the sample was in reference model r's training set (the adversary
    trained the references, so this is its knowledge, not ground truth about the target).
    ``reference_exit`` (n, R) int64 or None: the exit each reference model took (exit-aware variants).
    ``meta``: JSON-serialisable description (target, dataset, num_exits, num_classes, role, seed, repeats…).
    """

    member: np.ndarray
    true_label: np.ndarray
    pred_label: np.ndarray
    sample_index: np.ndarray
    num_exits: int
    num_classes: int
    probs: np.ndarray | None = None
    loss: np.ndarray | None = None
    exit_index: np.ndarray | None = None
    true_exit: np.ndarray | None = None
    latency_ns: np.ndarray | None = None
    embedding: np.ndarray | None = None
    gradient: np.ndarray | None = None
    label_only_score: np.ndarray | None = None
    reference_score: np.ndarray | None = None
    reference_in: np.ndarray | None = None
    reference_exit: np.ndarray | None = None
    latency_drift_ns: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.member)
        for name in _ARRAYS:
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise SignalsError(f"signals array {name!r} has {len(arr)} rows but there are {n} samples")
        if self.probs is not None and self.probs.shape[1] != self.num_classes:
            raise SignalsError(f"probs have {self.probs.shape[1]} columns but num_classes is {self.num_classes}")
        for name in ("exit_index", "true_exit", "reference_exit"):
            arr = getattr(self, name)
            if arr is not None and arr.size and (arr.min() < 0 or arr.max() >= self.num_exits):
                raise SignalsError(f"{name} values must lie in 0..{self.num_exits - 1}")
        shapes = {name: getattr(self, name).shape for name in REFERENCE_FIELDS if getattr(self, name) is not None}
        if len(set(shapes.values())) > 1 or any(len(sh) != 2 for sh in shapes.values()):
            raise SignalsError(f"reference arrays must all be (samples, references), got {shapes}")

    def __len__(self) -> int:
        return len(self.member)

    # ----------------------------------------------------------------------------------------- views
    def subset(self, idx: np.ndarray) -> Signals:
        """The rows ``idx`` (boolean mask or integer indices), with the same metadata."""
        kwargs = {name: (None if getattr(self, name) is None else getattr(self, name)[idx]) for name in _ARRAYS}
        return replace(self, **kwargs)

    def min_latency_ns(self) -> np.ndarray:
        """Per-sample minimum over repeats: the most robust single latency against queueing noise."""
        if self.latency_ns is None:
            raise SignalsError("these signals hold no latencies; collect them with repeats >= 1")
        return np.nanmin(self.latency_ns, axis=1)  # adaptive querying pads unmade repeats with NaN

    def drift_corrected_latency_ns(self) -> np.ndarray | None:
        """``latency_ns`` less the host's drift at each query (``latency_drift_ns``) when it was measured, else
        ``latency_ns``: the timings to compare with the shadow's on one clock."""
        if self.latency_ns is None or self.latency_drift_ns is None:
            return self.latency_ns
        return np.asarray(self.latency_ns, dtype=np.float64) - self.latency_drift_ns

    def with_exits(self, exits: np.ndarray, source: str) -> Signals:
        """A copy whose observed ``exit_index`` is ``exits`` (e.g. stolen from latency), noting the source."""
        return replace(self, exit_index=np.asarray(exits, dtype=np.int64), meta={**self.meta, "exit_source": source})

    @property
    def observed_exit(self) -> str:
        """Where ``exit_index`` came from: "exposed", "stolen", or "none"."""
        if self.exit_index is None:
            return "none"
        return str(self.meta.get("exit_source", "exposed"))

    # ------------------------------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> None:
        """Write atomically as ``.npz`` (arrays + JSON metadata)."""
        arrays = {name: getattr(self, name) for name in _ARRAYS if getattr(self, name) is not None}
        header = {"format": SIGNALS_FORMAT, "num_exits": self.num_exits, "num_classes": self.num_classes,
                  "meta": self.meta}
        save_npz(path, arrays, header)

    @classmethod
    def load(cls, path: str | Path) -> Signals:
        path = Path(path)
        if not path.exists():
            raise SignalsError(f"signals file {path} does not exist; collect it with mexit attack first")
        try:
            header, arrays = load_npz(path, _ARRAYS)
        except ValueError as exc:
            raise SignalsError(f"{path} is not a mexit signals file ({exc}); re-collect it") from None
        if header.get("format") != SIGNALS_FORMAT:
            raise SignalsError(f"{path} has signals format {header.get('format')}, this mexit reads {SIGNALS_FORMAT}")
        return cls(num_exits=int(header["num_exits"]), num_classes=int(header["num_classes"]),
                   meta=header.get("meta", {}), **arrays)

    def check_compatible(self, other: Signals, *, what: str = "shadow and target signals") -> None:
        """Refuse to combine signals whose classes, exits or observable fields differ."""
        if self.num_classes != other.num_classes:
            raise SignalsError(f"{what} disagree on the number of classes ({self.num_classes} vs {other.num_classes})")
        if self.num_exits != other.num_exits:
            raise SignalsError(f"{what} disagree on the number of exits ({self.num_exits} vs {other.num_exits})")
        mine = {f.name for f in fields(self) if f.name in _ARRAYS and getattr(self, f.name) is not None}
        theirs = {f.name for f in fields(other) if f.name in _ARRAYS and getattr(other, f.name) is not None}
        missing = (mine ^ theirs) - {"true_exit", "latency_ns", "latency_drift_ns", "embedding", "gradient",
                                     "label_only_score", *REFERENCE_FIELDS}
        if missing:
            raise SignalsError(f"{what} record different fields: {', '.join(sorted(missing))}")


def cross_entropy(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-sample cross-entropy ``-log p[y]`` from returned probabilities (attacker-side loss)."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).astype(np.float32)
