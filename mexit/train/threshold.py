"""Early-exit threshold search (paper §3.3), on per-exit probabilities the model owner already has.

The paper picks τ "among 0 to 1 in 0.05 steps" to keep the vanilla model's accuracy while lowering the
computational cost. We do the same on *validation* data that the owner carved off before training —
never on the samples the attacks are later evaluated on: for every candidate τ each sample leaves at
the first exit whose top-1 probability is at least τ (per sample, not per batch), and we keep the
cheapest τ whose accuracy stays within ``tolerance`` of the final exit's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

TAU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def simulate_exits(probs: Sequence[np.ndarray], tau: float) -> np.ndarray:
    """Exit index per sample under the max-probability rule: first exit with max prob >= τ, else the last."""
    if len(probs) == 1:
        return np.zeros(len(probs[0]), dtype=np.int64)
    conf = np.stack([p.max(axis=1) for p in probs], axis=1)  # (n, exits)
    fired = conf[:, :-1] >= tau
    first = np.argmax(fired, axis=1)
    return np.where(fired.any(axis=1), first, len(probs) - 1).astype(np.int64)


@dataclass(frozen=True)
class ThresholdPoint:
    tau: float
    accuracy: float
    mean_flops: float
    flops_fraction: float
    exit_shares: list[float]


@dataclass(frozen=True)
class ThresholdSearch:
    """The chosen τ and the whole accuracy/cost curve it was chosen from."""

    tau: float
    accuracy: float
    flops_fraction: float
    reference_accuracy: float
    tolerance: float
    curve: list[ThresholdPoint]

    def to_dict(self) -> dict:
        return asdict(self)


def search_threshold(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    exit_costs: Sequence[float],
    *,
    tolerance: float = 0.01,
    grid: Sequence[float] = TAU_GRID,
) -> ThresholdSearch:
    """Pick the τ with the lowest mean cost whose accuracy is within ``tolerance`` of the final exit's.

    ``probs[k]`` are softmax outputs of exit ``k`` on validation samples, ``exit_costs[k]`` the cost of
    leaving at exit ``k`` (use the runtime FLOPs: earlier heads included). Ties go to the larger τ
    (more conservative). With a single exit the answer is τ = 1 and the full cost.
    """
    labels = np.asarray(labels)
    costs = np.asarray(exit_costs, dtype=np.float64)
    preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)
    reference = float((preds[:, -1] == labels).mean()) if len(labels) else 0.0
    full = float(costs[-1])
    curve: list[ThresholdPoint] = []
    rows = np.arange(len(labels))
    for tau in grid:
        exits = simulate_exits(probs, tau)
        acc = float((preds[rows, exits] == labels).mean()) if len(labels) else 0.0
        mean_cost = float(costs[exits].mean()) if len(labels) else full
        shares = np.bincount(exits, minlength=len(probs)) / max(len(labels), 1)
        curve.append(ThresholdPoint(float(tau), acc, mean_cost, mean_cost / full, shares.tolist()))
    eligible = [p for p in curve if p.accuracy >= reference - tolerance] or [max(curve, key=lambda p: p.accuracy)]
    best = min(eligible, key=lambda p: (p.mean_flops, -p.tau))
    return ThresholdSearch(best.tau, best.accuracy, best.flops_fraction, reference, tolerance, curve)
