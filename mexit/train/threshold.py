"""Early-exit threshold search (paper §3.3), on per-exit probabilities the model owner already has.

The paper (``paper.txt`` line 168) searches τ "among 0 to 1 in 0.05 steps that achieve the same or similar
classification performance as vanilla (backbone) models while gaining lower computational cost" (also line
120: "guarantee the same or similar classification performance as vanilla models"). We do the same on
*validation* data that the owner carved off before training — never on the samples the attacks are later
evaluated on: for every candidate τ each sample leaves at the first exit whose top-1 probability is at least τ
(per sample, not per batch). The τ curve (accuracy, mean cost, exit shares per τ) is always kept, so any
choice can be checked and re-made later.

Two rules pick τ from the curve (:func:`choose_threshold`):

* ``vanilla`` (the paper's): the cheapest τ whose accuracy is within ``tolerance`` of the *vanilla* model's
  validation accuracy — the backbone trained without exits, i.e. a separate 1-exit run. This needs that
  model's accuracy (:func:`vanilla_accuracy` reads it from a run directory).
* ``final-exit``: the cheapest τ within ``tolerance`` of the multi-exit model's own final exit, for when no
  vanilla model was trained. Joint training changes the final exit (on Location it is *less* accurate than
  the early heads), so the two rules can pick very different τ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mexit.errors import ConfigError, UserError

TauRule = Literal["vanilla", "final-exit"]
TAU_RULES: tuple[str, ...] = ("vanilla", "final-exit")
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
    """The chosen τ and the whole accuracy/cost curve it was chosen from.

    ``reference_accuracy`` is the accuracy the rule compared against (the vanilla model's for ``rule ==
    "vanilla"``, else the final exit's); ``final_accuracy`` and ``vanilla_accuracy`` are both kept so a reader
    can see how far apart they are. ``within_tolerance`` is False when no τ met the tolerance and the most
    accurate τ was taken instead.
    """

    tau: float
    accuracy: float
    flops_fraction: float
    reference_accuracy: float
    tolerance: float
    curve: list[ThresholdPoint]
    rule: str = "final-exit"
    final_accuracy: float | None = None
    vanilla_accuracy: float | None = None
    within_tolerance: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThresholdSearch:
        """Rebuild a search from :meth:`to_dict` output (e.g. a run's ``metrics.json``; older runs lack ``rule``)."""
        fields = dict(data)
        fields["curve"] = [ThresholdPoint(**p) for p in data["curve"]]
        fields.setdefault("final_accuracy", data.get("reference_accuracy"))
        return cls(**fields)


def choose_threshold(
    curve: Sequence[ThresholdPoint],
    *,
    rule: str = "vanilla",
    final_accuracy: float,
    vanilla_accuracy: float | None = None,
    tolerance: float = 0.01,
) -> ThresholdSearch:
    """Pick τ from a τ curve by ``rule``: the lowest mean cost whose accuracy is within ``tolerance`` of the reference.

    ``rule="vanilla"`` (the paper's) compares with ``vanilla_accuracy`` and raises :class:`ConfigError` when it is
    not given; ``rule="final-exit"`` compares with ``final_accuracy`` (the multi-exit model's own last exit).
    Ties in cost go to the larger τ (more conservative). If no τ is within tolerance, the most accurate one is
    taken and ``within_tolerance`` is False.
    """
    if rule not in TAU_RULES:
        raise ConfigError(f"unknown threshold rule {rule!r}; use one of {', '.join(TAU_RULES)}")
    if not 0 <= tolerance <= 1:
        raise ConfigError(f"tolerance must lie in [0, 1], got {tolerance}")
    if not curve:
        raise ConfigError("the threshold curve is empty; give at least one candidate τ")
    if rule == "vanilla":
        if vanilla_accuracy is None:
            raise ConfigError("the 'vanilla' threshold rule needs the vanilla model's validation accuracy: train a "
                              "1-exit run and pass it (--vanilla-run), or use --tau-rule final-exit")
        reference = float(vanilla_accuracy)
    else:
        reference = float(final_accuracy)
    eligible = [p for p in curve if p.accuracy >= reference - tolerance - 1e-12]
    within = bool(eligible)
    if not eligible:
        top = max(p.accuracy for p in curve)
        eligible = [p for p in curve if p.accuracy == top]
    best = min(eligible, key=lambda p: (p.mean_flops, -p.tau))
    return ThresholdSearch(best.tau, best.accuracy, best.flops_fraction, reference, tolerance, list(curve), rule,
                           float(final_accuracy), None if vanilla_accuracy is None else float(vanilla_accuracy),
                           within)


def vanilla_accuracy(run: str | Path | Mapping[str, Any], *, arch: str | None = None,
                     dataset: str | None = None) -> float:
    """The validation accuracy of a vanilla (1-exit) run, read from its directory or its ``metrics.json`` dict.

    ``arch``/``dataset`` (the multi-exit model's) are checked against the vanilla run's: comparing against
    another backbone or dataset would make the paper's rule meaningless. Errors are one-line ConfigErrors.
    """
    if isinstance(run, Mapping):
        metrics, where = run, "the vanilla metrics"
    else:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise ConfigError(f"{run} is not a finished training run (no metrics.json); train the vanilla model "
                              "first with mexit train --exits 1")
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); retrain the vanilla run") from None
        where = str(run)
    if metrics.get("exits") != 1:
        raise ConfigError(f"{where} has {metrics.get('exits')} exits; the vanilla reference must be a 1-exit run "
                          "(mexit train --exits 1)")
    for name, want in (("arch", arch), ("dataset", dataset)):
        if want is not None and metrics.get(name) != want:
            raise ConfigError(f"{where} is a {metrics.get(name)} run but the multi-exit model is {want}; train the "
                              f"vanilla model with the same --{name}")
    try:
        return float(metrics["final_exit"]["val_accuracy"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where} records no validation accuracy; retrain it with this mexit") from None


def search_threshold(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    exit_costs: Sequence[float],
    *,
    tolerance: float = 0.01,
    grid: Sequence[float] = TAU_GRID,
    rule: str = "final-exit",
    vanilla_accuracy: float | None = None,
) -> ThresholdSearch:
    """Compute the τ curve on validation data and pick τ from it by ``rule`` (see :func:`choose_threshold`).

    ``probs[k]`` are softmax outputs of exit ``k`` on validation samples, ``exit_costs[k]`` the cost of
    leaving at exit ``k`` (use the runtime FLOPs: earlier heads included). With a single exit every τ costs the
    same and ties go to the larger τ, so the answer is τ = 1 and the full cost.
    """
    curve = threshold_curve(probs, labels, exit_costs, grid=grid)
    labels = np.asarray(labels)
    final = float((probs[-1].argmax(axis=1) == labels).mean()) if len(labels) else 0.0
    return choose_threshold(curve, rule=rule, final_accuracy=final, vanilla_accuracy=vanilla_accuracy,
                            tolerance=tolerance)


def threshold_curve(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    exit_costs: Sequence[float],
    *,
    grid: Sequence[float] = TAU_GRID,
) -> list[ThresholdPoint]:
    """Accuracy, mean cost and exit shares of the early-exit model for every τ in ``grid``."""
    labels = np.asarray(labels)
    costs = np.asarray(exit_costs, dtype=np.float64)
    preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)
    full = float(costs[-1])
    curve: list[ThresholdPoint] = []
    rows = np.arange(len(labels))
    for tau in grid:
        exits = simulate_exits(probs, tau)
        acc = float((preds[rows, exits] == labels).mean()) if len(labels) else 0.0
        mean_cost = float(costs[exits].mean()) if len(labels) else full
        shares = np.bincount(exits, minlength=len(probs)) / max(len(labels), 1)
        curve.append(ThresholdPoint(float(tau), acc, mean_cost, mean_cost / full, shares.tolist()))
    return curve


def deployed_accuracy(probs: Sequence[np.ndarray], labels: np.ndarray, tau: float) -> dict[str, Any]:
    """Accuracy of the early-exit model *as deployed* at ``tau`` (each sample answered by the exit it leaves at).

    Beside it, the final exit's accuracy and the share of samples per exit: members mostly leave at the first
    exits, whose accuracy is not the final exit's (issue 11, item 5).
    """
    labels = np.asarray(labels)
    n = len(labels)
    exits = simulate_exits(probs, tau)
    preds = np.stack([p.argmax(axis=1) for p in probs], axis=1)
    rows = np.arange(n)
    return {
        "tau": float(tau),
        "accuracy": float((preds[rows, exits] == labels).mean()) if n else 0.0,
        "final_exit_accuracy": float((preds[:, -1] == labels).mean()) if n else 0.0,
        "exit_shares": (np.bincount(exits, minlength=len(probs)) / max(n, 1)).tolist(),
    }
