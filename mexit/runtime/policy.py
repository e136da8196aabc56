"""Exit rules: when is a sample confident enough to leave at an internal exit?

Both rules work on the softmax of one exit's logits, row by row, so every sample of a batch gets its
own decision (a batch is never decided from its first sample):

* ``max_prob`` (the paper's rule): exit when ``max_c p_c >= threshold``. ``threshold <= 0`` sends
  every sample out at exit 0; ``threshold > 1`` sends every sample to the final exit.
* ``entropy`` (BranchyNet's rule, normalised): exit when ``H(p) / ln(C) <= threshold``, where
  ``H(p) = -Σ p_c ln p_c``. Dividing by ``ln C`` puts the score in [0, 1] whatever the number of
  classes, so one threshold means the same on CIFAR-10 and CIFAR-100: ``threshold >= 1`` exits
  everything at exit 0, ``threshold < 0`` nothing before the final exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mexit.bundle import POLICIES
from mexit.errors import ConfigError


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum so large logits cannot overflow."""
    z = logits if logits.dtype == np.float32 else np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)  # a new array: the backend's logits buffer is left untouched
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def shifted_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``e = exp(z - max_c z)`` (a new float32 array) and its row sums ``s`` (n, 1): ``softmax = e / s``.

    Split out of :func:`softmax` so that the runtime can decide an exit from ``s`` alone (the top
    probability is ``1 / s``: ``e`` is exactly 1 at the arg-max) and divide only the rows that leave.
    The arithmetic is the same as :func:`softmax`'s, so both give bit-identical probabilities.
    """
    z = logits if logits.dtype == np.float32 else np.asarray(logits, dtype=np.float32)
    e = z - z.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    return e, e.sum(axis=1, keepdims=True)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """``H(p) / ln(C)`` per row, in [0, 1] (0 for a one-hot row, 1 for the uniform distribution)."""
    c = probs.shape[1]
    if c < 2:
        return np.zeros(probs.shape[0], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return (-terms.sum(axis=1) / math.log(c)).astype(np.float32)


@dataclass(frozen=True)
class ExitPolicy:
    """A validated exit rule (see the module docstring for the semantics of ``threshold``)."""

    kind: str
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ConfigError(f"unknown exit policy {self.kind!r}; use one of {', '.join(POLICIES)}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) or not math.isfinite(
            self.threshold
        ):
            raise ConfigError(f"the exit threshold must be a finite number, got {self.threshold!r}")

    def score(self, probs: np.ndarray) -> np.ndarray:
        """The per-sample confidence statistic the rule thresholds."""
        return probs.max(axis=1) if self.kind == "max_prob" else normalized_entropy(probs)

    def exits(self, probs: np.ndarray) -> np.ndarray:
        """Boolean mask: which rows of ``probs`` (n, C) leave at this exit."""
        if self.kind == "max_prob":
            return probs.max(axis=1) >= self.threshold
        return normalized_entropy(probs) <= self.threshold

    def exits_shifted(self, e: np.ndarray, s: np.ndarray) -> np.ndarray:
        """:meth:`exits` from :func:`shifted_exp`'s ``(e, s)`` without forming every row's probabilities:
        for ``max_prob`` the top probability is ``1 / s`` (the same float32 division softmax does)."""
        if self.kind == "max_prob":
            return np.float32(1.0) / s[:, 0] >= self.threshold
        return normalized_entropy(e / s) <= self.threshold
