"""Membership attacks per adversary, scored once on the target: what each adversary sees, and how well it does.

Shared by ``mexit attack`` (:mod:`mexit.attacks.experiment`) and the audit pipeline.

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

from mexit.attacks.metrics import attack_metrics, roc_points
from mexit.attacks.mia import ATTACKS, get_attack
from mexit.attacks.signals import Signals
from mexit.attacks.stealing import KDEExitStealer, SupervisedExitStealer
from mexit.errors import UserError

log = logging.getLogger(__name__)

ROC_MAX_POINTS = 400
# What :func:`steal` computes, versioned: cached audit stages that used another version are redone.
# 2: trimmed-mean reduction, KDE aligned to the shadow's exits, blind KDE for adversary 3, logistic stealer.
# 3: the alignment maps clusters to non-decreasing (not strictly increasing) exits.
STEALING_VERSION = 3
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


def clip_exits(exits: np.ndarray, num_exits: int) -> np.ndarray:
    """Stolen exits as valid indices (an unsupervised stealer may find more clusters than exits)."""
    return np.clip(np.asarray(exits, dtype=np.int64), 0, num_exits - 1)


def steal(target_lat: np.ndarray, shadow_lat: np.ndarray, shadow_exits: np.ndarray, num_exits: int, seed: int
          ) -> tuple[dict[str, np.ndarray], dict[str, KDEExitStealer]]:
    """Exits stolen from ``target_lat`` by three stealers, and the two KDE fits (for reports).

    * ``kde-blind`` — the unsupervised KDE alone: the number of exits discovered, clusters numbered by
      latency rank. All an adversary without timings of its own for this architecture has (adversary 3).
    * ``kde`` — the KDE as adversary 2 runs it: it owns a same-architecture shadow deployment, so it asks
      for as many clusters as exits its shadow used and numbers them by matching each cluster to the exit
      whose shadow latency is closest (:meth:`KDEExitStealer.align`). Clustering the target's own timings
      keeps it robust to drift between the two deployments; the alignment fixes the numbering when fast
      exits go unused.
    * ``supervised`` — a classifier trained on the shadow's latencies and true exits (when the shadow took a
      single exit, it predicts that exit): strongest when both deployments time alike.
    """
    blind = KDEExitStealer(max_exits=num_exits).fit(target_lat)
    stolen = {"kde-blind": clip_exits(blind.predict(target_lat), num_exits)}
    used = len(np.unique(shadow_exits))
    aligned = KDEExitStealer(max_exits=num_exits, n_exits=used).fit(target_lat).align(shadow_lat, shadow_exits,
                                                                                       num_exits)
    stolen["kde"] = clip_exits(aligned.predict(target_lat), num_exits)
    sup = SupervisedExitStealer(seed=seed).fit(shadow_lat, shadow_exits)  # one shadow exit: always predicts it
    stolen["supervised"] = clip_exits(sup.predict(target_lat), num_exits)
    return stolen, {"kde": aligned, "kde-blind": blind}


def shadow_view(shadow: Signals) -> Signals:
    """The adversary's own shadow: it knows every exit its model took."""
    if shadow.true_exit is None:
        raise UserError("shadow signals hold no ground-truth exits; collect them with true_exit_runtime")
    return shadow.with_exits(shadow.true_exit, "shadow-known")


def target_view(adversary: int, target: Signals, stolen: dict[str, np.ndarray], stealer: str) -> Signals:
    """The target signals with the exit adversary ``adversary`` observes."""
    if adversary == 1:
        exits = target.exit_index if target.exit_index is not None else target.true_exit
        return target.with_exits(exits, "exposed")
    name = stealer if adversary == 2 else "kde-blind"
    return target.with_exits(clip_exits(stolen[name], target.num_exits), f"stolen-{name}")


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
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every requested attack for every requested adversary: JSON results and the per-sample scores."""
    results: dict[str, Any] = {}
    scores_out: dict[str, np.ndarray] = {}
    originals: dict[tuple[str, str], tuple[dict[str, Any], np.ndarray | None]] = {}
    for adv in adversaries:
        shadow_signals = shadow3 if adv == 3 else shadow
        if shadow_signals is None:
            raise UserError("adversary 3 needs the signals of its own shadow deployment")
        sv = shadow_view(shadow_signals)
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
                metrics, scores, _ = run_attack(name, sv, tv, seed=seed, bootstrap=bootstrap)
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
            pairs.append({"hybrid": name, "original": base,
                          "auc": [metric_value(o, "auc"), metric_value(h, "auc")],
                          "balanced_accuracy": [metric_value(o, "balanced_accuracy"),
                                                metric_value(h, "balanced_accuracy")]})
        results[str(adv)] = {
            "adversary": adv,
            "description": ADVERSARY_TEXT[adv],
            "exit_source": tv.observed_exit,
            "exit_accuracy": float(np.mean(tv.exit_index == target.true_exit)) if target.true_exit is not None
            else None,
            "attacks": attacks,
            "pairs": pairs,
            "best_original": best_of(attacks, hybrid=False),
            "best_hybrid": best_of(attacks, hybrid=True),
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
