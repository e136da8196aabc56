"""Leakage and cost of an early-exit deployment as functions of its threshold τ (issue 11, item 2).

Whether a multi-exit model leaks *less* than its vanilla backbone — the paper's headline (``paper.txt`` lines
21, 63, 93, 178) — depends on τ: a low τ sends most samples out at the first, least overfitted heads; a high τ
sends them to the final exit, which is as overfitted as the vanilla model. One τ answers the question for one
deployment; the sweep answers it for every τ the owner could have chosen, with the vanilla model as a
reference line.

For every τ of a grid, the target and the shadow deployments (:class:`~mexit.runtime.EarlyExitRuntime`, the
threshold overridden per τ) answer the member/non-member query sets in-process; :class:`Signals` are built
from those answers (no timing: the adversary of this sweep *sees* the exits, the paper's adversary 1), every
requested attack is fitted on the shadow signals and scores the target's (``get_attack(name, seed).fit(shadow)
.score(target)``), and the sweep records per τ:

* the exits taken (members and non-members), the mean FLOPs fraction of the full-depth model (from the
  bundle's cumulative FLOPs per exit) and the deployed model's accuracy on members and non-members;
* per attack AUC and balanced accuracy (the paper's ASR, decision threshold chosen on the shadow); and the
  summary ``best_original_auc``, ``best_hybrid_auc`` and ``exit_only_auc``.

The reference lines are the same attacks against the vanilla model: a separately trained 1-exit deployment
when given (the paper's comparison), else the multi-exit bundles run at full depth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mexit.attacks.mia import ATTACKS, get_attack
from mexit.attacks.signals import Signals, cross_entropy
from mexit.errors import ConfigError, InputError

log = logging.getLogger(__name__)

TAU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_ATTACKS: tuple[str, ...] = ("score", "loss", "confidence", "score-hybrid", "loss-hybrid",
                                    "confidence-hybrid", "exit-only")

Predictor = Callable[..., Any]


def runtime_signals(runtime: Any, x: np.ndarray, y: np.ndarray, member: np.ndarray, *,
                    sample_index: np.ndarray | None = None, full_depth: bool = False,
                    batch_size: int = 512) -> Signals:
    """What adversary 1 observes from one in-process deployment: probabilities, label, loss and exposed exit.

    ``runtime`` is anything with ``predict(x, full_depth=…) -> Prediction`` and ``num_exits``/``num_classes``
    (an :class:`~mexit.runtime.EarlyExitRuntime` with its threshold set). With ``full_depth`` every sample
    leaves at the final exit (the vanilla model of the same bundle).
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.int64)
    member = np.asarray(member, dtype=bool)
    if not len(x) == len(y) == len(member):
        raise InputError(f"x, y and member must have one row per sample, got {len(x)}, {len(y)}, {len(member)}")
    probs, exits = [], []
    for start in range(0, len(x), batch_size):
        pred = runtime.predict(x[start:start + batch_size], full_depth=full_depth)
        probs.append(pred.probs)
        exits.append(pred.exit_index)
    p = np.concatenate(probs).astype(np.float32)
    e = np.concatenate(exits).astype(np.int64)
    idx = np.arange(len(x), dtype=np.int64) if sample_index is None else np.asarray(sample_index, dtype=np.int64)
    return Signals(member=member, true_label=y, pred_label=p.argmax(axis=1).astype(np.int64), sample_index=idx,
                   num_exits=int(runtime.num_exits), num_classes=int(runtime.num_classes), probs=p,
                   loss=cross_entropy(p, y), exit_index=e, true_exit=e.copy(),
                   meta={"exit_source": "exposed", "full_depth": full_depth})


def attack_leakage(shadow: Signals, target: Signals, attacks: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """AUC and balanced accuracy of each attack, fitted on ``shadow`` only, scored on ``target``.

    Hybrid attacks are skipped (recorded as ``None``) when the deployment has one exit or every sample left at
    one exit in either deployment: the exit then carries no information and the attack degenerates.
    """
    out: dict[str, Any] = {}
    for name in attacks:
        hybrid = bool(getattr(ATTACKS[name], "hybrid", False))
        if hybrid and (target.num_exits < 2 or _single_exit(shadow) or _single_exit(target)):
            out[name] = None
            continue
        attack = get_attack(name, seed=seed).fit(shadow)
        scores = attack.score(target)
        out[name] = {"auc": float(roc_auc_score(target.member, scores)),
                     "balanced_accuracy": float(balanced_accuracy_score(target.member, scores >= attack.threshold_))}
    return out


def _single_exit(s: Signals) -> bool:
    return s.exit_index is None or len(np.unique(s.exit_index)) < 2


def summarize_leakage(leak: dict[str, Any]) -> dict[str, float | None]:
    """Best original and best hybrid AUC and ASR (balanced accuracy), and the exit-only AUC, of one τ's results.

    Both metrics are kept because a hybrid *threshold* attack (one threshold per exit) ranks samples exactly as
    its original does, so its AUC cannot differ; the gain the paper reports is in ASR (``paper.txt`` line 271).
    """
    def best(hybrid: bool, metric: str) -> float | None:
        vals = [v[metric] for n, v in leak.items()
                if v is not None and n != "exit-only" and bool(getattr(ATTACKS[n], "hybrid", False)) == hybrid]
        return max(vals) if vals else None

    exit_only = leak.get("exit-only")
    return {"best_original_auc": best(False, "auc"), "best_hybrid_auc": best(True, "auc"),
            "best_original_asr": best(False, "balanced_accuracy"), "best_hybrid_asr": best(True, "balanced_accuracy"),
            "exit_only_auc": None if exit_only is None else exit_only["auc"]}


def _check_attacks(attacks: Sequence[str]) -> list[str]:
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(sorted(ATTACKS))}")
    needs_more = [a for a in attacks if ATTACKS[a].requires - {"probs", "loss", "exit_index", "pred_label"}]
    if needs_more:
        raise ConfigError(f"the τ sweep builds score signals only; drop {', '.join(needs_more)} (they need "
                          "label-only or white-box signals) or run them through mexit attack at one τ")
    return list(attacks)


def _exit_shares(exits: np.ndarray, num_exits: int) -> list[float]:
    return (np.bincount(exits, minlength=num_exits) / max(len(exits), 1)).tolist()


def tau_sweep(
    make_target: Callable[[float], Any],
    make_shadow: Callable[[float], Any],
    target_queries: tuple[np.ndarray, np.ndarray, np.ndarray],
    shadow_queries: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    grid: Sequence[float] = TAU_GRID,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    vanilla: tuple[Any, Any] | None = None,
    deployed_tau: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Sweep τ over ``grid`` and return a JSON-able dict of exits, cost, accuracy and leakage per τ.

    ``make_target(tau)`` / ``make_shadow(tau)`` return a runtime deploying the target / shadow bundle at
    threshold ``tau`` (e.g. ``lambda t: EarlyExitRuntime(bundle, threshold=t)``); ``*_queries`` are ``(x, y,
    member)`` with members the positive class. ``vanilla = (target_runtime, shadow_runtime)`` of separately
    trained 1-exit models gives the paper's reference line; the multi-exit bundles at full depth are always
    measured too (``full_depth``). ``deployed_tau`` (the τ the owner chose) is marked in the result.
    """
    attacks = _check_attacks(attacks)
    grid = sorted({round(float(t), 6) for t in grid})
    if not grid or grid[0] < 0 or grid[-1] > 1:
        raise ConfigError(f"τ grid must be non-empty values in [0, 1], got {grid}")
    (tx, ty, tm), (sx, sy, sm) = target_queries, shadow_queries
    for name, m in (("target", tm), ("shadow", sm)):
        m = np.asarray(m, dtype=bool)
        if m.all() or not m.any():
            raise InputError(f"the {name} query set needs members and non-members")

    rows: list[dict[str, Any]] = []
    costs: np.ndarray | None = None
    for tau in grid:
        target_rt, shadow_rt = make_target(tau), make_shadow(tau)
        if costs is None:
            costs = np.asarray(target_rt.exit_costs, dtype=np.float64)
        t_sig = runtime_signals(target_rt, tx, ty, tm)
        s_sig = runtime_signals(shadow_rt, sx, sy, sm)
        leak = attack_leakage(s_sig, t_sig, attacks, seed=seed)
        assert t_sig.exit_index is not None and t_sig.probs is not None
        mem = t_sig.member
        correct = t_sig.pred_label == t_sig.true_label
        rows.append({
            "tau": tau,
            "exit_shares_members": _exit_shares(t_sig.exit_index[mem], t_sig.num_exits),
            "exit_shares_nonmembers": _exit_shares(t_sig.exit_index[~mem], t_sig.num_exits),
            "mean_flops_fraction": float(costs[t_sig.exit_index].mean() / costs[-1]),
            "accuracy_members": float(correct[mem].mean()),
            "accuracy_nonmembers": float(correct[~mem].mean()),
            "attacks": leak,
            **summarize_leakage(leak),
        })
        log.info("τ=%.2f: best original AUC %s, hybrid %s", tau, rows[-1]["best_original_auc"],
                 rows[-1]["best_hybrid_auc"])

    refs: dict[str, Any] = {}
    originals = [a for a in attacks if not getattr(ATTACKS[a], "hybrid", False)]
    full_t = runtime_signals(make_target(grid[-1]), tx, ty, tm, full_depth=True)
    full_s = runtime_signals(make_shadow(grid[-1]), sx, sy, sm, full_depth=True)
    refs["full_depth"] = _reference(full_s, full_t, originals, seed)
    if vanilla is not None:
        v_t = runtime_signals(vanilla[0], tx, ty, tm, full_depth=True)
        v_s = runtime_signals(vanilla[1], sx, sy, sm, full_depth=True)
        refs["vanilla"] = _reference(v_s, v_t, originals, seed)
    return {
        "grid": grid,
        "attacks": attacks,
        "deployed_tau": deployed_tau,
        "n_target": {"members": int(np.sum(tm)), "nonmembers": int(np.sum(~np.asarray(tm, dtype=bool)))},
        "exit_costs": None if costs is None else costs.tolist(),
        "rows": rows,
        "reference": refs,
        "seed": seed,
    }


def _reference(shadow: Signals, target: Signals, attacks: Sequence[str], seed: int) -> dict[str, Any]:
    leak = attack_leakage(shadow, target, attacks, seed=seed)
    correct = target.pred_label == target.true_label
    return {"attacks": leak, "best_original_auc": summarize_leakage(leak)["best_original_auc"],
            "accuracy_members": float(correct[target.member].mean()),
            "accuracy_nonmembers": float(correct[~target.member].mean())}


def plot_tau_sweep(result: dict[str, Any], path: Any = None, *, title: str | None = None) -> Any:
    """A two-panel figure: leakage (AUC) vs τ with the vanilla line, and mean FLOPs fraction vs τ.

    Returns the matplotlib ``Figure``; writes it to ``path`` when given (format from the suffix).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tau = [r["tau"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for key, label, style in (("best_original_auc", "best original attack", "-o"),
                              ("best_hybrid_auc", "best hybrid attack (exits exposed)", "-s"),
                              ("exit_only_auc", "exit index only", ":^")):
        ys = [np.nan if r[key] is None else r[key] for r in rows]
        if not all(np.isnan(ys)):
            ax.plot(tau, ys, style, label=label, markersize=3)
    for ref, label, color in (("vanilla", "vanilla model (1 exit)", "k"), ("full_depth", "final exit (full depth)",
                                                                            "grey")):
        val = result["reference"].get(ref, {}).get("best_original_auc")
        if val is not None:
            ax.axhline(val, color=color, linestyle="--", linewidth=1, label=label)
    if result.get("deployed_tau") is not None:
        for a in (ax, ax2):
            a.axvline(result["deployed_tau"], color="tab:red", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("early-exit threshold τ")
    ax.set_ylabel("membership AUC (target)")
    ax.legend(fontsize=7)
    ax2.plot(tau, [r["mean_flops_fraction"] for r in rows], "-o", markersize=3, label="mean FLOPs / full depth")
    ax2.plot(tau, [r["accuracy_nonmembers"] for r in rows], "-s", markersize=3, label="accuracy, non-members")
    ax2.plot(tau, [r["accuracy_members"] for r in rows], "-^", markersize=3, label="accuracy, members")
    ax2.set_xlabel("early-exit threshold τ")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
