"""The three adversaries of the paper: what each one observes, and its attacks scored once on the target.

Used by the attack flow (:mod:`mexit.attacks.flow`), which ``mexit attack`` and the audit both run.

The three adversaries of the paper differ only in where the exit they feed a hybrid attack comes from
and which shadow they trained:

* **1** — the exit is exposed (the deployment returns it, or, when it does not, the audit uses the exits
  an exit-exposing deployment would return, which are the true ones); same-architecture shadow.
* **2** — the exit is stolen from response times (``attacks.stealer``: the supervised stealer trained on
  the shadow deployment's timings, or the KDE aligned to them, see :func:`steal`); same-architecture shadow.
* **3** — a shadow of another architecture and/or trained on other data; exits stolen with the blind KDE
  (timings of a different architecture do not transfer, so neither the supervised stealer nor the
  alignment has anything to learn from).

Every attack is fitted on shadow signals only (the shadow's own exits are known to its owner) and the
target is scored once. Original (non-hybrid) attacks ignore exits, so their result depends only on the
shadow; they are computed once per shadow and shared between adversaries 1 and 2.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mexit.attacks.metrics import (
    attack_metrics,
    low_fpr_tpr,
    paired_bootstrap,
    roc_points,
    significance_statement,
)
from mexit.attacks.mia import ATTACKS, get_attack
from mexit.attacks.signals import Signals
from mexit.attacks.stealing import clip_exits
from mexit.errors import UserError

log = logging.getLogger(__name__)

ROC_MAX_POINTS = 400
ADVERSARY_TEXT = {
    1: "exit exposed by the deployment, same-architecture shadow",
    2: "exit stolen from response times, same-architecture shadow",
    3: "exit stolen from response times, shadow of another architecture or data",
}


def original_of(name: str) -> str | None:
    """The non-hybrid attack a hybrid one extends (``score-hybrid`` → ``score``); None for ``exit-only``."""
    if not ATTACKS[name].hybrid:
        return None
    base = name.removesuffix("-hybrid")
    return base if base != name and base in ATTACKS else None


def shadow_view(shadow: Signals, exits: np.ndarray | None = None) -> Signals:
    """The adversary's own shadow, with the exits its hybrid attacks are fitted on.

    Default: the true exits (its owner knows them) — right for adversary 1, who reads the target's exits
    too. Adversaries 2 and 3 pass ``exits`` stolen from the shadow's own timings (cross-fitted), so their
    attacks learn how far a stolen exit can be trusted (a model fitted on true exits and applied to stolen
    ones trusts a feature that is wrong whenever stealing errs).
    """
    if shadow.true_exit is None:
        raise UserError("shadow signals hold no ground-truth exits; collect them with true_exit_runtime")
    if exits is None:
        return shadow.with_exits(shadow.true_exit, "shadow-known")
    return shadow.with_exits(clip_exits(exits, shadow.num_exits), "shadow-stolen")


def target_view(adversary: int, target: Signals, stolen: dict[str, np.ndarray], stealer: str) -> Signals:
    """The target signals with the exit adversary ``adversary`` observes."""
    if adversary == 1:
        exits = target.exit_index if target.exit_index is not None else target.true_exit
        return target.with_exits(exits, "exposed")
    name = stealer if adversary == 2 else "kde-blind"
    return target.with_exits(clip_exits(stolen[name], target.num_exits), f"stolen-{name}")


def fitting_signals(name: str, shadow_view_: Signals, target_view_: Signals) -> Signals:
    """What attack ``name`` is fitted on: the shadow, or — for a reference attack whose shadow has no IN
    reference (online LiRA/RMIA need them) — reference model 0 playing the target among the other references
    (Privacy Meter's paired model). That uses only the adversary's own knowledge: which samples each of its
    reference models trained on, never the target's membership."""
    if not getattr(ATTACKS[name], "online", False):
        return shadow_view_
    ref_in = shadow_view_.reference_in
    if ref_in is not None and ref_in.any():
        return shadow_view_
    if target_view_.reference_in is None or not target_view_.reference_in.any():
        return shadow_view_  # no IN reference anywhere: the attack refuses with its own message
    from mexit.attacks.reference import paired_shadow

    return paired_shadow(target_view_, 0)


def downsample_roc(member: np.ndarray, scores: np.ndarray, max_points: int = ROC_MAX_POINTS) -> dict[str, Any]:
    """ROC points for plots (at most ``max_points``, end points kept) and the FPR resolution floor."""
    roc = roc_points(member, scores)
    fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
    if len(fpr) > max_points:
        idx = np.unique(np.r_[np.linspace(0, len(fpr) - 1, max_points).round().astype(int), len(fpr) - 1])
        fpr, tpr = fpr[idx], tpr[idx]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "fpr_floor": float(roc["fpr_floor"])}


def run_attack(name: str, shadow: Signals, target: Signals, *, seed: int, bootstrap: int
               ) -> tuple[dict[str, Any], np.ndarray | None, Any]:
    """Fit ``name`` on ``shadow``, score ``target`` once; metrics (with CIs), scores and the fitted attack.

    A user-fixable failure (a missing signal, too few samples) becomes ``{"error": message}`` rather than
    ending the audit: the other attacks are still worth reporting.
    """
    try:
        attack = get_attack(name, seed=seed).fit(shadow)
        scores = attack.score(target)
    except UserError as exc:
        log.warning("attack %s failed: %s", name, exc)
        return {"error": str(exc)}, None, None
    metrics = attack_metrics(target.member, scores, threshold=float(attack.threshold_), n_bootstrap=bootstrap,
                             seed=seed)
    metrics["low_fpr"] = low_fpr_tpr(target.member, scores)  # Clopper-Pearson, or "not measurable" with few non-members
    metrics["significance"] = significance_statement(metrics)
    metrics["roc"] = downsample_roc(target.member, scores)
    metrics["hybrid"] = bool(ATTACKS[name].hybrid)
    return metrics, scores, attack


def metric_value(entry: dict[str, Any], metric: str) -> float | None:
    """``entry[metric]["value"]`` of an attack result, None when the attack failed."""
    item = entry.get(metric)
    return None if not isinstance(item, dict) else float(item["value"])


def best_of(attacks: dict[str, dict[str, Any]], *, hybrid: bool, metric: str = "auc") -> dict[str, Any] | None:
    """The attack (name, AUC, balanced accuracy) with the highest ``metric`` among the (non-)hybrid ones."""
    rows = [(n, e) for n, e in attacks.items() if "error" not in e and bool(e.get("hybrid")) == hybrid]
    if not rows:
        return None
    name, entry = max(rows, key=lambda r: metric_value(r[1], metric) or 0.0)
    return {"attack": name, "auc": metric_value(entry, "auc"),
            "balanced_accuracy": metric_value(entry, "balanced_accuracy")}


def _best_pair(best_h: dict[str, Any] | None, best_o: dict[str, Any] | None, scores: dict[str, np.ndarray], adv: int,
               member: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any] | None:
    """The best hybrid against the best original attack, paired on the same target samples: what the exit adds over
    the strongest attack without it. A hybrid's gain over its *own* original can come from that original failing
    (e.g. a shadow-fitted rule that does not transfer to the target, AUC below 0.5), not from the exit."""
    if not (best_h and best_o and bootstrap):
        return None
    sh, so = scores.get(f"adv{adv}/{best_h['attack']}"), scores.get(f"adv{adv}/{best_o['attack']}")
    if sh is None or so is None:
        return None
    return {"hybrid": best_h["attack"], "original": best_o["attack"],
            "paired": paired_bootstrap(member, so, sh, n_bootstrap=bootstrap, seed=seed)}


def evaluate_adversaries(
    names: list[str],
    adversaries: list[int],
    *,
    target: Signals,
    shadow: Signals,
    shadow3: Signals | None,
    stolen: dict[str, np.ndarray],
    stealer: str,
    seed: int,
    bootstrap: int,
    shadow_exits: dict[int, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every requested attack for every requested adversary: JSON results and the per-sample scores.

    ``shadow_exits``: per adversary, the exits its shadow's hybrid attacks are fitted on (stolen,
    cross-fitted, for adversaries 2 and 3); absent adversaries use the shadow's true exits.
    """
    shadow_exits = shadow_exits or {}
    results: dict[str, Any] = {}
    scores_out: dict[str, np.ndarray] = {}
    originals: dict[tuple[str, str], tuple[dict[str, Any], np.ndarray | None]] = {}
    for adv in adversaries:
        shadow_signals = shadow3 if adv == 3 else shadow
        if shadow_signals is None:
            raise UserError("adversary 3 needs the signals of its own shadow deployment")
        sv = shadow_view(shadow_signals, shadow_exits.get(adv))
        tv = target_view(adv, target, stolen, stealer)
        attacks: dict[str, Any] = {}
        for name in names:
            if adv == 3 and "gradient" in ATTACKS[name].requires:
                attacks[name] = {"error": "white-box attack: adversary 3 has no access to the target model",
                                 "hybrid": bool(ATTACKS[name].hybrid)}
                continue
            hybrid = bool(ATTACKS[name].hybrid)
            cache_key = ("shadow3" if adv == 3 else "shadow", name)
            if not hybrid and cache_key in originals:
                metrics, scores = originals[cache_key]
            else:
                metrics, scores, _ = run_attack(name, fitting_signals(name, sv, tv), tv, seed=seed,
                                                bootstrap=bootstrap)
                if not hybrid:
                    originals[cache_key] = (metrics, scores)
            metrics = {**metrics, "hybrid": hybrid, "original": original_of(name)}
            attacks[name] = metrics
            if scores is not None:
                scores_out[f"adv{adv}/{name}"] = scores
        pairs = []
        for name in names:
            base = original_of(name)
            if base is None or base not in attacks:
                continue
            h, o = attacks[name], attacks[base]
            if "error" in h or "error" in o:
                continue
            pair: dict[str, Any] = {"hybrid": name, "original": base,
                                    "auc": [metric_value(o, "auc"), metric_value(h, "auc")],
                                    "balanced_accuracy": [metric_value(o, "balanced_accuracy"),
                                                          metric_value(h, "balanced_accuracy")]}
            so, sh = scores_out.get(f"adv{adv}/{base}"), scores_out.get(f"adv{adv}/{name}")
            if bootstrap and so is not None and sh is not None:
                # the same target samples scored by both: the difference gets a paired interval, not two
                # overlapping unpaired ones (a "gain" is only a gain when this interval excludes 0)
                pair["paired"] = paired_bootstrap(target.member, so, sh, n_bootstrap=bootstrap, seed=seed)
            pairs.append(pair)
        best_o, best_h = best_of(attacks, hybrid=False), best_of(attacks, hybrid=True)
        results[str(adv)] = {
            "adversary": adv,
            "description": ADVERSARY_TEXT[adv],
            "exit_source": tv.observed_exit,
            "exit_accuracy": float(np.mean(tv.exit_index == target.true_exit)) if target.true_exit is not None
            else None,
            "attacks": attacks,
            "pairs": pairs,
            "best_original": best_o,
            "best_hybrid": best_h,
            "best_hybrid_vs_best_original": _best_pair(best_h, best_o, scores_out, adv, target.member, bootstrap,
                                                       seed),
        }
    return results, scores_out


def evaluate_vanilla(names: list[str], *, target: Signals, shadow: Signals, seed: int, bootstrap: int
                     ) -> dict[str, Any]:
    """The original (non-hybrid) attacks against the 1-exit baseline, fitted on its own shadow."""
    attacks: dict[str, Any] = {}
    for name in names:
        if ATTACKS[name].hybrid:
            continue
        metrics, _, _ = run_attack(name, shadow, target, seed=seed, bootstrap=bootstrap)
        attacks[name] = {**metrics, "hybrid": False}
    return {"attacks": attacks, "best_original": best_of(attacks, hybrid=False)}
