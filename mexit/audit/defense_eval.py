"""What the timing defenses buy and cost, on the latencies the audit recorded.

:func:`evaluate_defenses` (issue 12) puts every registered defense — no defense, a TimeGuard σ grid,
padding to a high quantile and the optimal schedule over ε — on one frontier: mean/p99 added latency
against the strongest judges (the exact Bayes bound, the oracle stealer, the shipped stealers) in
*balanced* accuracy over the exits in use (chance 1/K), an exit-ranking AUC, and the membership gain
that matters (best hybrid − best original AUC with a paired bootstrap interval); it recommends the
cheapest point meeting the rule and says in a sentence which defense wins. :func:`live_defense_confirmation`
judges any defense on a live recording.

For every defense the recorded target latencies are replaced by what a guarded deployment would have
shown (:func:`mexit.defense.apply_offline`: ``max(recorded, release)``), and the attacker is given every
advantage it would have: every shipped stealer is refitted on the adversary's own shadow timings guarded
the same way (with the shadow's own key: the adversary does not know the target's), and the hybrid attacks
score the target with the newly stolen exits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from mexit.attacks.metrics import exit_balanced_accuracy
from mexit.attacks.oracle import OracleStealer
from mexit.attacks.signals import Signals
from mexit.attacks.stealing import steal
from mexit.defense import (
    CleanTimes,
    DefenseConfig,
    added_latency_summary,
    apply_offline,
    build_policy,
    parse_defense,
)
from mexit.defense.bayes import no_release, repeat_statistics_bound
from mexit.errors import ConfigError

log = logging.getLogger(__name__)


def latencies_s(signals: Signals) -> np.ndarray:
    """All recorded latencies of ``signals`` in seconds, (n, repeats)."""
    if signals.latency_ns is None:
        raise ValueError("signals hold no latencies")
    return np.asarray(signals.latency_ns, dtype=np.float64) / 1e9


GAIN_TOLERANCE = 0.01
ORACLE_TOLERANCE = 0.05
DEFAULT_SIGMAS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
DEFAULT_EPSILONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def default_defenses(sigmas_ms: Sequence[float] = DEFAULT_SIGMAS_MS,
                     epsilons: Sequence[float] = DEFAULT_EPSILONS) -> list[DefenseConfig]:
    """The frontier's default points: TimeGuard over a σ grid, padding at p99.9, the optimal schedule over ε."""
    out = [parse_defense("timeguard", {"sigma_ms": s}) for s in sigmas_ms]
    out.append(parse_defense("padding"))
    out += [parse_defense("optimal", {"epsilon": e}) for e in epsilons]
    return out


def exit_ranking_auc(times: np.ndarray, exits: np.ndarray) -> float | None:
    """P(the deeper of two samples at different exits has the longer time), ties half: a concordance AUC.

    ``(1 + Somers' D(time | exit)) / 2``; 0.5 means guarded time no longer orders exits by depth. With
    two exits it is the usual ROC AUC of time for "deeper exit". None with fewer than two exits in use.
    """
    ex = np.asarray(exits, dtype=np.int64)
    if np.unique(ex).size < 2:
        return None
    # Somers' D on a contingency table: bin times by rank so that the table stays small.
    ranks = stats.rankdata(np.asarray(times, dtype=np.float64), method="dense")
    if ranks.max() == 1:  # every sample released at the same time: no order at all
        return 0.5
    d = stats.somersd(ex, ranks).statistic
    return float((1.0 + d) / 2.0) if np.isfinite(d) else 0.5


def exit_ranking_auc_ci(times: np.ndarray, exits: np.ndarray, *, n_bootstrap: int = 200, seed: int = 0,
                        level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of :func:`exit_ranking_auc` over samples (resampled with replacement): whether a
    live ranking AUC of, say, 0.56 is the guard showing the exits' order or sampling noise. None when the statistic is
    undefined or ``n_bootstrap`` is 0."""
    t, ex = np.asarray(times, dtype=np.float64), np.asarray(exits, dtype=np.int64)
    if n_bootstrap <= 0 or exit_ranking_auc(t, ex) is None:
        return None

    def statistic(tb: np.ndarray, eb: np.ndarray) -> float:
        v = exit_ranking_auc(tb, eb)  # None only when a resample holds a single exit: no order to measure
        return 0.5 if v is None else v

    res = stats.bootstrap((t, ex), statistic, paired=True, vectorized=False, n_resamples=n_bootstrap,
                          confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def _aucs(scores: np.ndarray, member: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC (members positive) of ``scores`` on every bootstrap row of ``idx`` (B, n), vectorised by ranks."""
    s = np.asarray(scores, dtype=np.float64)[idx]
    y = np.asarray(member, dtype=bool)[idx]
    r = stats.rankdata(s, axis=1)
    n1 = y.sum(axis=1)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * y).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def membership_gain(hybrid_scores: Mapping[str, np.ndarray], original_scores: Mapping[str, np.ndarray],
                    member: np.ndarray, *, n_bootstrap: int = 200, seed: int = 0, ci: float = 0.95
                    ) -> dict[str, Any] | None:
    """Best hybrid AUC − best original AUC, with a paired bootstrap interval (both maxima re-taken per resample)."""
    if not hybrid_scores or not original_scores:
        return None
    m = np.asarray(member, dtype=bool)
    n = m.size
    point = np.arange(n)[None, :]
    best = {name: float(_aucs(s, m, point)[0]) for name, s in {**hybrid_scores, **original_scores}.items()}
    value = max(best[h] for h in hybrid_scores) - max(best[o] for o in original_scores)
    out: dict[str, Any] = {"value": value, "ci": None, "best_hybrid_auc": max(best[h] for h in hybrid_scores),
                           "best_original_auc": max(best[o] for o in original_scores)}
    if n_bootstrap > 0:
        idx = np.random.default_rng(seed).integers(0, n, (n_bootstrap, n))
        hyb = np.max([_aucs(s, m, idx) for s in hybrid_scores.values()], axis=0)
        orig = np.max([_aucs(s, m, idx) for s in original_scores.values()], axis=0)
        diff = (hyb - orig)[np.isfinite(hyb - orig)]
        if diff.size:
            alpha = (1 - ci) / 2
            out["ci"] = [float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha))]
    return out


def _release_cdf(policy: Any, medians: np.ndarray) -> Callable[[int, np.ndarray], np.ndarray]:
    if policy is None:
        return no_release
    return lambda k, grid: policy.release_cdf(k, grid, medians)


def _fit_policy(config: DefenseConfig | None, key: bytes, kind: str, clean: CleanTimes) -> Any:
    if config is None:
        return None
    policy = build_policy(config, key=key, kind=kind)
    fit = getattr(policy, "fit", None)
    if callable(fit):
        fit(clean)
    return policy


def _frontier_row(config: DefenseConfig | None, *, target: Signals, shadow: Signals, x_target: np.ndarray,
                  x_shadow: np.ndarray, kind: str, key: bytes, shadow_key: bytes, lat_t: np.ndarray,
                  lat_s: np.ndarray, clean_t: CleanTimes, clean_s: CleanTimes, stealer: str,
                  hybrid_attacks: Mapping[str, Any], original_scores: Mapping[str, np.ndarray] | None,
                  n_bootstrap: int, oracle: OracleStealer, seed: int) -> dict[str, Any]:
    assert target.true_exit is not None and shadow.true_exit is not None
    k = target.num_exits
    ex_t, ex_s = target.true_exit, shadow.true_exit
    med_t, med_s = clean_t.medians(), clean_s.medians()
    policy = _fit_policy(config, key, kind, clean_t)
    if policy is None:
        g_t, g_s = lat_t, lat_s
    else:
        g_t = apply_offline(policy, lat_t, ex_t, x_target, med_t)
        # The adversary guards its own shadow the same way, with its own key and its own calibration.
        g_s = apply_offline(_fit_policy(config, shadow_key, kind, clean_s), lat_s, ex_s, x_shadow, med_s)
    stolen, _ = steal(g_t, g_s, ex_s, k, seed)
    bayes, bayes_per_statistic = repeat_statistics_bound(lat_t, ex_t, _release_cdf(policy, med_t))
    oracle_ba = oracle.balanced_accuracy(g_t, ex_t)
    shipped = {name: exit_balanced_accuracy(ex_t, s) for name, s in stolen.items()}
    hybrid_scores: dict[str, np.ndarray] = {}
    hybrid: dict[str, Any] = {}
    view = target.with_exits(stolen[stealer], f"stolen-{stealer}")
    for name, attack in hybrid_attacks.items():
        scores = np.asarray(attack.score(view), dtype=np.float64)
        hybrid_scores[name] = scores
        hybrid[name] = {"auc": float(roc_auc_score(target.member, scores))}
    gain = membership_gain(hybrid_scores, original_scores or {}, target.member, n_bootstrap=n_bootstrap, seed=seed)
    cost = added_latency_summary(lat_t, g_t)
    reduced = g_t.min(axis=1)
    return {
        "defense": "none" if config is None else config.name,
        "label": "none" if config is None else config.label(),
        "params": {} if config is None else dict(config.params),
        "policy": None if policy is None else (policy.describe() if hasattr(policy, "describe") else None),
        "mean_added_ms": cost["mean_added_s"] * 1e3,
        "p99_added_ms": cost["p99_added_s"] * 1e3,
        "mean_latency_ms": cost["mean_after_s"] * 1e3,
        "p99_latency_ms": cost["p99_after_s"] * 1e3,
        "relative_mean_increase": cost["relative_mean_increase"],
        # released at completion because compute overran the target (padding's tail; TimeGuard's lower tail)
        "overrun_share": 0.0 if policy is None else float(np.mean(g_t == lat_t)),
        "bayes_bound": bayes,
        "bayes_bound_per_statistic": bayes_per_statistic,
        "oracle_balanced_accuracy": oracle_ba,
        "stealer_balanced_accuracy": shipped,
        "best_shipped_balanced_accuracy": max(shipped.values()),
        "strongest_balanced_accuracy": max(oracle_ba, bayes, *shipped.values()),
        "exit_ranking_auc": exit_ranking_auc(reduced, ex_t),
        "hybrid": hybrid,
        "hybrid_gain": gain,
        # plain accuracies next to the balanced ones (a skewed exit mix makes plain accuracy look protective)
        "kde_accuracy": float(np.mean(stolen["kde"] == ex_t)),
        "kde_blind_accuracy": float(np.mean(stolen["kde-blind"] == ex_t)),
        "supervised_accuracy": float(np.mean(stolen["supervised"] == ex_t)),
        "sigma_ms": None if config is None or config.name != "timeguard" else config.params["sigma_ms"],
    }


def meets_rule(row: Mapping[str, Any], chance: float, *, gain_tolerance: float = GAIN_TOLERANCE,
               oracle_tolerance: float = ORACLE_TOLERANCE) -> bool:
    """Issue 12's protection rule: hybrid gain ≤ tolerance with its interval reaching 0, and the oracle's
    balanced accuracy within ``oracle_tolerance`` of 1/K — here the larger of the oracle and the Bayes bound,
    since a finite-sample oracle can fall short of what the policy really lets through. Without membership
    attacks only the stealing part counts."""
    if max(row["oracle_balanced_accuracy"], row["bayes_bound"]) > chance + oracle_tolerance:
        return False
    gain = row.get("hybrid_gain")
    if gain is None:
        return True
    low = gain["ci"][0] if gain.get("ci") else gain["value"]
    return bool(gain["value"] <= gain_tolerance and low <= 0.0)


def _verdict(rows: list[dict[str, Any]], chance: float) -> tuple[dict[str, Any] | None, str]:
    """The cheapest row meeting the rule, and a sentence comparing each family's cheapest meeting point."""
    meeting = [r for r in rows if r["meets"]]
    if not meeting:
        return None, ("no defense of the frontier meets the rule (oracle balanced accuracy within "
                      f"{ORACLE_TOLERANCE:g} of 1/K = {chance:.3f} and hybrid gain ≤ {GAIN_TOLERANCE:g} AUC); "
                      "extend the grid (larger σ, smaller ε, higher padding quantile)")
    best = min(meeting, key=lambda r: (r["mean_added_ms"], r["p99_added_ms"]))
    if best["defense"] == "none":
        return best, "no defense is needed: without one the exit is already hidden from every stealer"
    per_family: dict[str, dict[str, Any]] = {}
    for r in meeting:
        cur = per_family.get(r["defense"])
        if cur is None or r["mean_added_ms"] < cur["mean_added_ms"]:
            per_family[r["defense"]] = r
    parts = [f"{best['label']} wins: it meets the rule at +{best['mean_added_ms']:.2f} ms mean "
             f"(+{best['p99_added_ms']:.2f} ms p99)"]
    for fam, r in sorted(per_family.items()):
        if fam == best["defense"]:
            continue
        ratio = r["mean_added_ms"] / best["mean_added_ms"] if best["mean_added_ms"] > 0 else float("inf")
        parts.append(f"{r['label']} needs +{r['mean_added_ms']:.2f} ms mean (+{r['p99_added_ms']:.2f} ms p99, "
                     f"{ratio:.1f}x)")
    missing = sorted({r["defense"] for r in rows} - set(per_family) - {"none"})
    if missing:
        parts.append(f"no {', '.join(missing)} point of the grid meets it")
    return best, "; ".join(parts) + "."


def evaluate_defenses(
    *,
    target: Signals,
    shadow: Signals,
    x_target: np.ndarray,
    x_shadow: np.ndarray,
    kind: str,
    key: bytes,
    shadow_key: bytes,
    defenses: Sequence[DefenseConfig] | None = None,
    hybrid_attacks: Mapping[str, Any] | None = None,
    original_scores: Mapping[str, np.ndarray] | None = None,
    stealer: str = "supervised",
    seed: int = 0,
    n_bootstrap: int = 200,
    oracle_folds: int = 5,
    gain_tolerance: float = GAIN_TOLERANCE,
    oracle_tolerance: float = ORACLE_TOLERANCE,
    calibration: Literal["all", "min"] = "all",
) -> dict[str, Any]:
    """The defense frontier on recorded latencies (JSON-ready): cost vs protection per defense, the
    recommendation and a sentence on which defense wins.

    ``defenses`` default to :func:`default_defenses`; ``hybrid_attacks`` are fitted on the shadow (as for
    :func:`timeguard_frontier`), ``original_scores`` the non-hybrid attacks' membership scores on the target
    (name → (n,) scores, members positive). A defense that cannot be built on this recording (e.g. ε above
    1 − 1/K for the exits in use) is listed under ``skipped`` with its one-line reason. ``calibration``: the
    recorded repeats the policies are calibrated on (``"all"``, or each sample's fastest, ``"min"``).
    """
    if target.true_exit is None or shadow.true_exit is None:
        raise ConfigError("the defense frontier needs ground-truth exits in the target and shadow signals")
    k = target.num_exits
    lat_t, lat_s = latencies_s(target), latencies_s(shadow)
    # Calibrate on every repeat (calibration="all"): a repeat slower than the release shows through, and
    # the oracle and the Bayes bound see it. "min" calibrates on each sample's fastest repeat, right when the
    # recording's spread is client-side noise that a live guard adds after its release, not compute time.
    clean_t = CleanTimes.from_recorded(lat_t, target.true_exit, k, reduce=calibration)
    clean_s = CleanTimes.from_recorded(lat_s, shadow.true_exit, k, reduce=calibration)
    used = np.unique(target.true_exit)
    chance = 1.0 / used.size
    oracle = OracleStealer(folds=oracle_folds, seed=seed)
    common = {"target": target, "shadow": shadow, "x_target": x_target, "x_shadow": x_shadow, "kind": kind,
              "key": key, "shadow_key": shadow_key, "lat_t": lat_t, "lat_s": lat_s, "clean_t": clean_t,
              "clean_s": clean_s, "stealer": stealer, "hybrid_attacks": hybrid_attacks or {},
              "original_scores": original_scores, "n_bootstrap": n_bootstrap, "oracle": oracle, "seed": seed}
    rows = [_frontier_row(None, **common)]
    skipped = []
    for config in default_defenses() if defenses is None else defenses:
        try:
            rows.append(_frontier_row(config, **common))
        except ConfigError as exc:
            skipped.append({"label": config.label(), "reason": str(exc)})
            continue
        r = rows[-1]
        log.info("%s: +%.3f ms mean, Bayes %.3f, oracle %.3f, ranking AUC %s", r["label"], r["mean_added_ms"],
                 r["bayes_bound"], r["oracle_balanced_accuracy"], r["exit_ranking_auc"])
    for r in rows:
        r["meets"] = meets_rule(r, chance, gain_tolerance=gain_tolerance, oracle_tolerance=oracle_tolerance)
    best, sentence = _verdict(rows, chance)
    return {
        "chance_balanced": chance,
        "exits_in_use": used.tolist(),
        "exit_shares": clean_t.shares.tolist(),
        "clean_times": clean_t.describe(),
        "stealer": stealer,
        "oracle_label": OracleStealer.label,
        "rule": f"cheapest mean added latency with the oracle's balanced accuracy and the Bayes bound within "
                f"{oracle_tolerance:g} of "
                f"1/K = {chance:.3f} and the hybrid membership gain <= {gain_tolerance:g} AUC with its "
                f"{n_bootstrap}-resample paired bootstrap interval reaching 0",
        "rows": rows,
        "skipped": skipped,
        "recommended": None if best is None else {"label": best["label"], "defense": best["defense"],
                                                  "params": best["params"], "needed": best["defense"] != "none"},
        "verdict": sentence,
        "calibration": calibration,
        "note": "offline: guarded latency = max(recorded, release); the Bayes bound is the largest over the "
                "repeats' order statistics (each commutes with a per-input release) of kernel-smoothed "
                "clean-time distributions; the oracle is "
                "cross-validated on the target's own guarded timings with true exits (an upper bound no "
                "real attacker has)",
    }


def live_defense_confirmation(
    *,
    live: Signals,
    baseline: Signals,
    shadow: Signals,
    x_shadow: np.ndarray,
    kind: str,
    shadow_key: bytes,
    config: DefenseConfig,
    stealer: str,
    hybrid_attacks: Mapping[str, Any],
    original_scores: Mapping[str, np.ndarray] | None = None,
    offline_row: Mapping[str, Any] | None = None,
    seed: int = 0,
    n_bootstrap: int = 200,
    calibration: Literal["all", "min"] = "all",
) -> dict[str, Any]:
    """Any registered defense judged on latencies recorded live from the guarded deployment (``live``).

    Like :func:`live_confirmation` (which takes a TimeGuard σ), for every defense of the registry and
    with the issue-12 judges: shipped stealers (the shadow guarded the same way with the adversary's own
    key), the oracle, the exit-ranking AUC and the hybrid gain against ``original_scores``. ``baseline``
    is an undefended recording made just before, for the cost.
    """
    if live.true_exit is None or shadow.true_exit is None:
        raise ConfigError("live confirmation needs ground-truth exits in the live and shadow signals")
    k = live.num_exits
    lat_live, lat_s = latencies_s(live), latencies_s(shadow)
    clean_s = CleanTimes.from_recorded(lat_s, shadow.true_exit, k, reduce=calibration)
    g_s = apply_offline(_fit_policy(config, shadow_key, kind, clean_s), lat_s, shadow.true_exit, x_shadow,
                        clean_s.medians())
    stolen, _ = steal(lat_live, g_s, shadow.true_exit, k, seed)
    shipped = {name: exit_balanced_accuracy(live.true_exit, s) for name, s in stolen.items()}
    view = live.with_exits(stolen[stealer], f"stolen-{stealer}")
    hybrid_scores = {name: np.asarray(a.score(view), dtype=np.float64) for name, a in hybrid_attacks.items()}
    before, after = latencies_s(baseline), lat_live
    return {
        "defense": config.name,
        "label": config.label(),
        "params": dict(config.params),
        "stealer_balanced_accuracy": shipped,
        "oracle_balanced_accuracy": OracleStealer(seed=seed).balanced_accuracy(lat_live, live.true_exit),
        "exit_ranking_auc": exit_ranking_auc(lat_live.min(axis=1), live.true_exit),
        "exit_ranking_auc_ci": exit_ranking_auc_ci(lat_live.min(axis=1), live.true_exit, n_bootstrap=n_bootstrap,
                                                   seed=seed),
        "hybrid_gain": membership_gain(hybrid_scores, original_scores or {}, live.member, n_bootstrap=n_bootstrap,
                                       seed=seed),
        "mean_added_ms": (float(after.mean()) - float(before.mean())) * 1e3,
        "p99_added_ms": (float(np.percentile(after, 99)) - float(np.percentile(before, 99))) * 1e3,
        "chance_balanced": 1.0 / np.unique(live.true_exit).size,
        "offline_prediction": None if offline_row is None else {key: offline_row.get(key) for key in (
            "bayes_bound", "oracle_balanced_accuracy", "mean_added_ms", "p99_added_ms", "exit_ranking_auc")},
        # plain accuracies, the shape stealing_accuracy() reads
        "kde_accuracy": float(np.mean(stolen["kde"] == live.true_exit)),
        "kde_blind_accuracy": float(np.mean(stolen["kde-blind"] == live.true_exit)),
        "supervised_accuracy": float(np.mean(stolen["supervised"] == live.true_exit)),
    }
