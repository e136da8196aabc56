"""The audit report: a self-contained ``report.html`` (figures embedded as PNG) and a terminal summary.

:func:`build_report` reads only ``results.json`` and the artifacts it names (signals, owner-side exits
and losses), so ``mexit report RUN_DIR`` rebuilds the page without re-running anything. The page opens
with the verdict — does the deployment leak through its exits and response times, how much better are
the hybrid attacks, and what TimeGuard costs to stop it — followed by the evidence, figure by figure.
Figures are drawn with matplotlib's Agg backend and embedded as ``data:image/png;base64`` images; the
page loads nothing from anywhere.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_bytes
from mexit.attacks.metrics import INVERTED_MEANING, interval_side
from mexit.audit.figures import png_base64
from mexit.errors import UserError

log = logging.getLogger(__name__)

FIGURES = ("accuracy_flops", "exit_distribution", "loss", "latency", "roc", "asr", "tau_sweep", "defense_frontier")
#: The paper's own words on its central finding (``shared/reference/paper.txt``, line 178).
PAPER_FINDING = ("“We can observe that all the multi-exit models have lower ASR than the vanilla models.” "
                 "(Li et al., CCS'22; paper.txt line 178)")
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# ------------------------------------------------------------------------------------------ numbers
def served_defense_note(state: dict[str, Any] | None) -> str | None:
    """One sentence on what the served guard did while the live recording ran (its own calibration, refits,
    overruns), from :func:`mexit.serve.deploy.runtime_state`; None when the deployment reported nothing."""
    if not state or "requests" not in state:
        return None
    requests, overruns = int(state["requests"]), int(state.get("overruns", 0))
    text = (f"The served guard planned on its own start-up calibration ({state.get('calibration', '?')}) and answered "
            f"{requests} requests, {overruns} of them after their release ({100 * overruns / max(requests, 1):.1f} %")
    if state.get("overruns_per_exit") and state.get("requests_per_exit"):
        text += ", by exit: " + ", ".join(f"{o}/{r}" for o, r in zip(state["overruns_per_exit"],
                                                                     state["requests_per_exit"], strict=False))
    text += ")"
    if state.get("adapt"):
        shifts = ", ".join(f"{1e3 * v:.2f}" for v in state.get("live_shift_s") or [])
        history = state.get("refit_history") or []
        when = (" after requests " + ", ".join(str(h["at_request"]) for h in history)) if history else ""
        text += (f"; it refitted {state.get('refits', 0)} time(s) on live times{when} ({state.get('relaxes', 0)} "
                 f"relaxation(s)), ending with a margin of {1e3 * float(state.get('refit_margin_s', 0)):.2f} ms and "
                 f"live shifts per exit of [{shifts}] ms")
        if history:
            first = history[0]["overruns_per_exit_before"]
            text += (f"; {sum(first)} of the overruns came before the first refit, while the start-up schedule "
                     "was in force")
    if state.get("bayes_bound") is not None:
        text += f"; its schedule's own Bayes bound {float(state['bayes_bound']):.3f}"
    if state.get("earliest_release_s") is not None:
        text += f", earliest release {1e3 * float(state['earliest_release_s']):.2f} ms after compute starts"
    return text + "."


def live_verdict(live: dict[str, Any], block: dict[str, Any] | None, config: dict[str, Any]) -> str:
    """One sentence on the defense served for real: does its oracle stay within the audit's tolerance of 1/K?

    The offline frontier plans a defense on recorded latencies; the live check serves it and attacks it again.
    When the live oracle is further from 1/K than the tolerance allows, the sentence says the defense does not
    hold live (the offline prediction is quoted beside it) instead of calling it confirmed.
    """
    oracle = live.get("oracle_balanced_accuracy")
    chance = block.get("chance_balanced") if block else None
    tol = float((config.get("timeguard") or {}).get("oracle_tolerance", 0.05))
    offline = (live.get("offline_prediction") or {}).get("oracle_balanced_accuracy")
    if oracle is None or chance is None:
        state = "could not be judged live (no oracle result)"
    elif oracle <= chance + tol:
        state = "holds live"
    else:
        state = "does NOT hold live: the deployed defense leaks more than the offline frontier predicted"
    ranking, ci = live.get("exit_ranking_auc"), live.get("exit_ranking_auc_ci")
    order = ""
    if ranking is not None and ci:
        shows = {"above": "the exits' order still shows in the release times",
                 "below": "the release times order the exits the wrong way round",
                 "includes": "the release times do not order the exits (the interval includes 0.5)"}[
            interval_side(ci, 0.5)]
        order = f"; exit-ranking AUC {ranking:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]: {shows}"
    return (f"Live check of {live['label']}: oracle stealer balanced accuracy {_fmt(oracle, 2)} (1/K = "
            f"{_fmt(chance, 2)}, tolerance {tol:g}; offline prediction {_fmt(offline, 2)}) — {state}{order}; mean "
            f"latency {live['mean_added_ms']:+.3f} ms against an undefended recording made just before it.")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _val(entry: dict[str, Any] | None, metric: str) -> float | None:
    if not entry or "error" in entry or not isinstance(entry.get(metric), dict):
        return None
    return float(entry[metric]["value"])


def _headline_adversary(results: dict[str, Any]) -> dict[str, Any] | None:
    """The adversary to headline: 2 (timing) when run, else the strongest hybrid."""
    advs = results.get("adversaries") or {}
    if "2" in advs:
        return advs["2"]
    rows = [a for a in advs.values() if a.get("best_hybrid")]
    return max(rows, key=lambda a: a["best_hybrid"]["auc"] or 0.0) if rows else None


def verdict(results: dict[str, Any]) -> list[str]:
    """The summary verdict, one sentence per finding (stealing, attacks, defense, baseline)."""
    lines: list[str] = []
    if results["config"]["deployment"]["expose_exit"]:
        lines.append("The deployment returns exit indices: every client reads the exit directly (Adversary 1), "
                     "so no delay on the response time can hide it.")
    st = results["stealing"]
    chosen = (st.get("stealers") or {}).get(st.get("chosen", ""), {})
    if "balanced_accuracy" in chosen:
        leaks = chosen["balanced_accuracy"] > chosen["balanced_chance"] + 0.05
        best = _best_stealer(st)
        hindsight = "" if best is None or best[1]["balanced_accuracy"] <= chosen["balanced_accuracy"] + 0.005 else (
            f" In hindsight the {best[0]} stealer would have done {best[1]['balanced_accuracy']:.2f}.")
        lines.append(
            f"{'Leaks' if leaks else 'No clear leak'} through response times: the stealer adversary 2 picks on its own "
            f"shadow ({st['chosen']}) recovers the target's exits with balanced accuracy "
            f"{chosen['balanced_accuracy']:.2f} over the {_n_used(chosen)} exits in use (chance "
            f"{chosen['balanced_chance']:.2f}); plain accuracy {chosen['accuracy']:.2f} against {chosen['chance']:.2f} "
            f"for always guessing the most common exit.{hindsight}"
        )
    adv = _headline_adversary(results)
    if adv and adv.get("best_original"):
        o = adv["best_original"]
        sig = adv["attacks"][o["attack"]].get("significance")
        lines.append(f"Membership (adversary {adv['adversary']}, best original attack {o['attack']}): {sig}."
                     if sig else f"Membership: best original attack {o['attack']} AUC {o['auc']:.2f}.")
    if adv and adv.get("best_hybrid") and adv.get("best_original"):
        h, o = adv["best_hybrid"], adv["best_original"]
        pair = next((p for p in adv["pairs"] if p["hybrid"] == h["attack"]), None)
        paired = (pair or {}).get("paired", {}).get("auc")
        best = (adv.get("best_hybrid_vs_best_original") or {}).get("paired", {}).get("auc")
        gain = ""
        if best and pair and pair["original"] != o["attack"]:
            # its own original is not the best one: what the exit adds is measured against the best
            gain = f"; paired difference {_paired_text(best)} against that best original"
            own = adv["attacks"].get(pair["original"], {})
            if paired:
                gain += f", {_paired_text(paired)} against its own original {pair['original']}"
                if auc_reading(own) == "inverted":
                    gain += (f" — whose AUC {_val(own, 'auc'):.2f} lies below 0.5 (inverted: its shadow-fitted rule "
                             "does not transfer), so that gain is the original's failure, not the exit's information")
        elif paired:
            gain = f"; paired difference {_paired_text(paired)} against its own original {pair['original']}"
        lines.append(
            f"Adversary {adv['adversary']} ({adv['description']}): best hybrid attack {h['attack']} AUC {h['auc']:.2f} "
            f"vs {o['auc']:.2f} for the best original attack {o['attack']}{gain}."
        )
    block = results.get("defenses")
    if block:
        lines.append(f"Timing defenses, judged by the oracle stealer and the Bayes bound: {block['verdict']}")
    live = results.get("live")
    if live:
        lines.append(live_verdict(live, block, results.get("config", {})))
    van = results.get("vanilla")
    if van and van.get("best_original") and adv and adv.get("best_original"):
        v_auc, m_auc = van["best_original"]["auc"], adv["best_original"]["auc"]
        v_ci = van["attacks"][van["best_original"]["attack"]]["auc"].get("ci")
        m_ci = adv["attacks"][adv["best_original"]["attack"]]["auc"].get("ci")
        overlap = bool(v_ci and m_ci and v_ci[0] <= m_ci[1] and m_ci[0] <= v_ci[1])
        if overlap:
            finding = ("the two are not distinguishable here (their 95% intervals overlap), so this run neither "
                       "confirms nor contradicts the paper")
        elif m_auc < v_auc:
            finding = "here the multi-exit model leaks less, as the paper found"
        else:
            finding = "here the multi-exit model leaks more, the opposite of what the paper found"
        lines.append(
            f"Vanilla (1-exit) baseline: best original attack AUC {v_auc:.2f} {_ci_text(v_ci)} vs {m_auc:.2f} "
            f"{_ci_text(m_ci)} on the multi-exit model at its deployed τ: {finding}. The paper: {PAPER_FINDING}. "
            f"The answer depends on τ: see the τ sweep."
        )
    sweep = results.get("tau_sweep")
    if sweep and sweep.get("reference", {}).get("vanilla"):
        ref = sweep["reference"]["vanilla"]["best_original_auc"]
        below = [r["tau"] for r in sweep["rows"] if r["best_original_auc"] is not None and r["best_original_auc"] < ref]
        lines.append(
            f"τ sweep (exits exposed, in-process, same samples): the multi-exit model's best original attack AUC is "
            f"below the vanilla model's ({ref:.2f}) at {len(below)} of {len(sweep['rows'])} thresholds"
            + (f" (τ = {', '.join(f'{t:g}' for t in below)})" if 0 < len(below) < len(sweep["rows"]) else "")
            + "; point estimates, see the τ-sweep table for the size of the differences."
        )
    return lines


def _with_ci(value: float | None, ci: list[float] | None) -> str | float | None:
    """``value [lo, hi]`` when an interval is known (results written before it existed have none)."""
    return value if value is None or not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _paired_text(paired: dict[str, Any]) -> str:
    """A paired AUC difference with its interval and what the interval says."""
    lo, hi = paired["ci"]
    reading = {"above": "a significant gain", "below": "significantly worse",
               "includes": "not significant (the interval includes 0)"}[interval_side(paired["ci"], 0.0)]
    return f"{paired['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] — {reading}"


def _low_fpr(entry: dict[str, Any], fpr: str) -> str:
    """TPR at a low FPR with its exact interval, or why it cannot be measured on this many non-members."""
    row = entry["low_fpr"][fpr]
    if row.get("value") is None:
        return row.get("note") or "not measurable"
    return f"{row['value']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"


def _ci_text(ci: list[float] | None) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def auc_reading(entry: dict[str, Any]) -> str:
    """What an attack's AUC interval says, in a word: ``leaks`` (above 0.5), ``n.s.`` (includes it), ``inverted``
    (below it: the shadow-fitted rule ranks the target's members lower, see ``significance_statement``)."""
    ci = (entry.get("auc") or {}).get("ci")
    if not ci:
        return "no CI"
    return {"above": "leaks", "below": "inverted", "includes": "n.s."}[interval_side(ci, 0.5)]


INVERTED_NOTE = f"inverted: the AUC's whole interval lies below 0.5 — {INVERTED_MEANING}."


def _best_stealer(st: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The stealer with the highest balanced accuracy (None when the true exits were unknown)."""
    rows = [(n, e) for n, e in (st.get("stealers") or {}).items() if "balanced_accuracy" in e]
    return max(rows, key=lambda r: r[1]["balanced_accuracy"]) if rows else None


def _n_used(entry: dict[str, Any]) -> int:
    return sum(r is not None for r in entry.get("per_exit_recall", []))


STEALER_TEXT = {
    "kde": "KDE aligned to the shadow's exits",
    "kde-blind": "KDE blind: exits discovered, numbered by rank (adversary 3's)",
    "supervised": "supervised (class-balanced logistic) on the shadow's timings",
    "supervised-gbt": "supervised (gradient-boosted trees) on the shadow's timings",
    "likelihood": "per-exit timing likelihood fitted on the shadow",
    "nearest": "nearest shadow per-exit centre",
}


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f}%"


def summary_table(results: dict[str, Any]) -> str:
    """A short plain-text summary for the terminal: verdict, attacks per adversary, TimeGuard."""
    out = ["", *verdict(results), ""]
    header = f"{'adversary':<10}{'attack':<20}{'AUC':>8}{'95% CI':>16}{'reading':>10}{'ASR':>8}{'TPR@1%':>9}"
    out.append(header)
    out.append("-" * len(header))
    inverted = False
    for key, adv in sorted((results.get("adversaries") or {}).items()):
        for name, entry in adv["attacks"].items():
            if "error" in entry:
                out.append(f"{key:<10}{name:<20}{'failed: ' + entry['error'][:40]:>25}")
                continue
            tpr = entry["tpr_at_fpr"].get("0.01", {}).get("value")
            ci = (entry.get("auc") or {}).get("ci")
            reading = auc_reading(entry)
            inverted |= reading == "inverted"
            out.append(f"{key:<10}{name:<20}{_fmt(_val(entry, 'auc')):>8}"
                       f"{(f'[{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '–'):>16}{reading:>10}"
                       f"{_fmt(_val(entry, 'balanced_accuracy')):>8}{_fmt(tpr):>9}")
    out.append("(reading: leaks = AUC interval above 0.5; n.s. = it includes 0.5"
               + ("; " + INVERTED_NOTE + ")" if inverted else ")"))
    block = results.get("defenses")
    if block:
        out.append("")
        rec = (block.get("recommended") or {}).get("label")
        labels = [row["label"] + (" *" if row["label"] == rec else "") for row in block["rows"]]
        width = max(len("defense"), *map(len, labels)) + 2
        out.append(f"{'defense':<{width}}{'oracle':>8}{'Bayes':>8}{'gain AUC':>10}{'+ms mean':>10}{'+ms p99':>9}")
        for label, row in zip(labels, block["rows"], strict=True):
            gain = (row.get("hybrid_gain") or {}).get("value")  # the hybrid's paired AUC gain over the original
            out.append(f"{label:<{width}}{_fmt(row.get('oracle_balanced_accuracy')):>8}"
                       f"{_fmt(row.get('bayes_bound')):>8}{_fmt(gain):>10}{_fmt(row.get('mean_added_ms')):>10}"
                       f"{_fmt(row.get('p99_added_ms')):>9}")
        out.append(f"(* recommended; balanced accuracies against 1/K = {block['chance_balanced']:.3f})")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ figures
def _fig_accuracy_flops(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    target = r["models"]["target"]
    per = target["per_exit"]
    k = np.arange(len(per))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.bar(k - 0.2, [p["train_accuracy"] for p in per], 0.4, label="train (members)", color=_COLORS[0])
    ax.bar(k + 0.2, [p["test_accuracy"] for p in per], 0.4, label="test (non-members)", color=_COLORS[1])
    van = r["models"].get("vanilla-target")
    lows = [p["test_accuracy"] for p in per]
    if van:
        ax.axhline(van["final_exit"]["test_accuracy"], color="k", ls="--", lw=1, label="vanilla test accuracy")
        lows.append(van["final_exit"]["test_accuracy"])  # the axis must show the line its legend names
    ax.set_xticks(k, [f"exit {i}" for i in k])
    ax.set_ylabel("accuracy")
    lo = min(min(lows), 0.9)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax2 = ax.twinx()
    ax2.plot(k, [p["flops_fraction"] for p in per], "o-", color=_COLORS[2], label="FLOPs (fraction of full)")
    ax2.set_ylabel("cumulative FLOPs fraction")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    ax.set_title(f"{target['arch']} on {target['dataset']}: accuracy and cost per exit")
    fig.tight_layout()
    return fig


def _fig_exit_distribution(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    d = r["leakage"]
    m, n = np.asarray(d["members_per_exit"], float), np.asarray(d["nonmembers_per_exit"], float)
    k = np.arange(len(m))
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.bar(k - 0.2, m / max(m.sum(), 1), 0.4, label="members", color=_COLORS[0])
    ax.bar(k + 0.2, n / max(n.sum(), 1), 0.4, label="non-members", color=_COLORS[1])
    ax.set_xticks(k, [f"exit {i}" for i in k])
    for i in k:
        if m[i] + n[i] == 0:
            ax.annotate("no sample\nleaves here", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                        fontsize=7, color="grey")
    ax.set_ylabel("share of samples")
    ax.set_title("Where members and non-members leave the target")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _js_rows(leakage: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-exit loss divergence as rows {exit, value, baseline, n} (:func:`mexit.attacks.metrics.per_exit_js`)."""
    return [{"exit": row["exit"], "value": row["js"], "baseline": row["baseline_mean"],
             "n": f"{row['n_members']}/{row['n_nonmembers']}", "p": row["p_value"]}
            for row in leakage.get("loss_js_divergence_per_exit") or []]


def _fig_loss(r: dict[str, Any], run_dir: Path) -> Any:
    import matplotlib.pyplot as plt

    with np.load(run_dir / r["artifacts"]["target_owner"]) as z:
        exits, loss, member = z["exit_index"], z["loss"], z["member"].astype(bool)
    rows = _js_rows(r["leakage"])
    k = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    ll = np.log10(np.asarray(loss, float) + 1e-12)
    lo, hi = float(np.quantile(ll, 0.005)), float(np.quantile(ll, 0.995))
    bins = np.linspace(lo, max(hi, lo + 1e-3), 40)
    ll = np.clip(ll, bins[0], bins[-1])
    for e in range(k):
        sel = exits == e
        if sel.any():
            axes[0].hist(ll[sel & member], bins=bins, histtype="step", color=_COLORS[e % 8], lw=1.5,
                         label=f"exit {e} members")
            axes[0].hist(ll[sel & ~member], bins=bins, histtype="step", color=_COLORS[e % 8], ls="--", lw=1.5,
                         label=f"exit {e} non-members")
    axes[0].set_xlabel("log10 loss")
    axes[0].set_ylabel("samples")
    axes[0].set_title("Loss by exit (solid: members, dashed: non-members)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    x = np.arange(k)
    vals = [np.nan if row["value"] is None else row["value"] for row in rows]
    axes[1].bar(x - 0.2, vals, 0.4, color=_COLORS[3], label="members vs non-members")
    base = [np.nan if row["baseline"] is None else row["baseline"] for row in rows]
    if not all(np.isnan(base)):
        axes[1].bar(x + 0.2, base, 0.4, color="lightgrey", label="shuffled labels (baseline)")
        axes[1].legend(fontsize=7)
    for row in rows:
        if row["value"] is None:
            axes[1].annotate("too few\nsamples", (row["exit"], 0), xytext=(0, 4), textcoords="offset points",
                             ha="center", fontsize=7, color="grey")
    axes[1].set_xticks(x, [f"exit {row['exit']}\n{row['n']}" for row in rows], fontsize=7)
    axes[1].set_ylabel("JS divergence of loss")
    axes[1].set_title("Member/non-member loss divergence by exit", fontsize=9)
    return fig


def _fig_latency(r: dict[str, Any], run_dir: Path) -> Any:
    import matplotlib.pyplot as plt
    from scipy.stats import trim_mean

    from mexit.attacks.signals import Signals

    t = Signals.load(run_dir / r["artifacts"]["target_signals"])
    lat = np.asarray(t.latency_ns, dtype=np.float64) / 1e6
    lat = trim_mean(lat, 0.2, axis=1) if lat.ndim == 2 and lat.shape[1] > 2 else np.nanmean(np.atleast_2d(lat), axis=1)
    exits = t.true_exit if t.true_exit is not None else np.zeros(len(lat), dtype=int)
    hi = float(np.quantile(lat, 0.995))
    lo = float(lat.min())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 80)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    used = [e for e in range(t.num_exits) if np.any(exits == e)]
    ax.hist([np.clip(lat[exits == e], lo, hi) for e in used], bins=bins, stacked=True, density=True,
            color=[_COLORS[e % 8] for e in used], label=[f"true exit {e}" for e in used], alpha=0.8)
    kde = (r["stealing"].get("stealers") or {}).get("kde", {})
    for i, b in enumerate(kde.get("fit", {}).get("boundaries_ms", [])):
        ax.axvline(b, color="k", ls="--", lw=1, label="KDE exit boundary" if i == 0 else None)
    ax.set_xlabel("response time, 20%-trimmed mean over repeats (ms) — what the stealers use")
    ax.set_ylabel("density")
    ax.set_title("Target response times and the exit boundaries stolen from them")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fig_roc(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    advs = sorted((r.get("adversaries") or {}).items())
    fig, axes = plt.subplots(1, max(len(advs), 1), figsize=(4.2 * max(len(advs), 1), 3.8), squeeze=False)
    for ax, (key, adv) in zip(axes[0], advs, strict=False):
        floor = None
        for i, (name, entry) in enumerate(adv["attacks"].items()):
            if "error" in entry or "roc" not in entry:
                continue
            roc = entry["roc"]
            floor = roc["fpr_floor"]
            fpr = np.maximum(np.asarray(roc["fpr"]), floor)
            tpr = np.maximum(np.asarray(roc["tpr"]), floor)
            ax.plot(fpr, tpr, ls="-" if entry.get("hybrid") else "--", color=_COLORS[i % 8], lw=1.3,
                    label=f"{name} ({_val(entry, 'auc'):.2f})")
        if floor:
            ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"Adversary {key} (solid: hybrid)", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def _fig_asr(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    rows = []
    for key, adv in sorted((r.get("adversaries") or {}).items()):
        for p in adv["pairs"]:
            o, h = adv["attacks"][p["original"]], adv["attacks"][p["hybrid"]]
            rows.append((f"A{key} {p['original']}", o["balanced_accuracy"], h["balanced_accuracy"]))
        if "exit-only" in adv["attacks"] and "error" not in adv["attacks"]["exit-only"]:
            e = adv["attacks"]["exit-only"]["balanced_accuracy"]
            rows.append((f"A{key} exit-only", None, e))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    for off, idx, label, color in ((-0.2, 1, "original", _COLORS[0]), (0.2, 2, "hybrid", _COLORS[1])):
        vals = [row[idx]["value"] if row[idx] else np.nan for row in rows]
        err = [[(row[idx]["value"] - row[idx]["ci"][0]) if row[idx] and row[idx]["ci"] else 0 for row in rows],
               [(row[idx]["ci"][1] - row[idx]["value"]) if row[idx] and row[idx]["ci"] else 0 for row in rows]]
        ax.bar(x + off, vals, 0.4, yerr=err, capsize=2, label=label, color=color)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [row[0] for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("attack success rate (balanced accuracy)")
    ax.set_ylim(0.4, 1.0)
    ax.set_title("Original vs hybrid attacks per adversary (95% CI)")
    ax.legend(fontsize=8)
    return fig


def _fig_defense(r: dict[str, Any]) -> Any:
    from mexit.audit.report_defense import _fig_protection

    if not r.get("defenses"):
        raise ValueError("this audit evaluated no defense")
    return _fig_protection(r["defenses"])


def _fig_tau_sweep(r: dict[str, Any]) -> Any:
    from mexit.attacks.tau_sweep import plot_tau_sweep

    if not r.get("tau_sweep"):
        raise ValueError("this audit ran no τ sweep (tau_sweep.enabled = false)")
    return plot_tau_sweep(r["tau_sweep"], title="Leakage and cost vs the early-exit threshold τ")


def render_figures(results: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """Every figure of the report as base64 PNG, by name (a figure that cannot be drawn is logged and left out)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    makers = {
        "accuracy_flops": lambda: _fig_accuracy_flops(results),
        "exit_distribution": lambda: _fig_exit_distribution(results),
        "loss": lambda: _fig_loss(results, run_dir),
        "latency": lambda: _fig_latency(results, run_dir),
        "roc": lambda: _fig_roc(results),
        "asr": lambda: _fig_asr(results),
        "tau_sweep": lambda: _fig_tau_sweep(results),
        "defense_frontier": lambda: _fig_defense(results),
    }
    figures: dict[str, str] = {}
    for name, make in makers.items():
        try:
            figures[name] = png_base64(make())
        except Exception:  # a broken figure must not cost the reader the rest of the report
            log.exception("figure %s could not be drawn; it is left out of the report", name)
            import matplotlib.pyplot as plt

            plt.close("all")
    return figures


# --------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;color:#222;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.verdict{background:#fff7e6;border-left:4px solid #f0a020;padding:.6em 1em}
.verdict li{margin:.3em 0}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
img{max-width:100%}.muted{color:#777;font-size:.85em}
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ci(entry: dict[str, Any], metric: str) -> str:
    item = entry.get(metric)
    if not isinstance(item, dict):
        return "–"
    ci = item.get("ci")
    return f"{item['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _img(name: str, figures: dict[str, str], alt: str) -> str:
    b64 = figures.get(name)
    if b64 is None:
        return f"<p class='muted'>(figure “{html.escape(alt)}” could not be drawn; see the log)</p>"
    return f'<figure><img id="fig-{name}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'


def backend_label(deployment: dict[str, Any]) -> str:
    """The deployed backend with its own options, e.g. ``onnxruntime (int8_heads=true)``."""
    opts = deployment.get("backend_options") or {}
    shown = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(opts.items()))
    return str(deployment.get("backend", "onnxruntime")) + (f" ({shown})" if shown else "")


def render_html(results: dict[str, Any], figures: dict[str, str]) -> str:
    """The report page (figures given as base64 PNG by name)."""
    cfg = results["config"]
    target = results["models"]["target"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mexit audit: {html.escape(target['arch'])} "
             f"on {html.escape(target['dataset'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>Membership-leakage audit: {html.escape(target['arch'])}, {target['exits']} exits, on "
             f"{html.escape(target['dataset'])}</h1>",
             "<div class='verdict'><b>Verdict</b><ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdict(results))
             + "</ul></div>",
             f"<p class='muted'>Deployment: {html.escape(cfg['deployment']['mode'])} on "
             f"{html.escape(backend_label(cfg['deployment']))}, exposes "
             f"{html.escape(cfg['deployment']['expose'])}{' and exits' if cfg['deployment']['expose_exit'] else ''}; "
             f"threshold τ={target['deployed_threshold']:.3f} ({html.escape(str(target['threshold_source']))}); "
             f"{cfg['queries']['members']} members + {cfg['queries']['nonmembers']} non-members queried "
             f"{cfg['queries']['repeats']}× each; seed {cfg['seed']}; config {results['config_hash'][:12]}; "
             f"schema {html.escape(results['schema'])}.</p>"]

    parts.append("<h2>Accuracy and cost per exit</h2>")
    parts.append(_img("accuracy_flops", figures, "accuracy and FLOPs per exit"))
    rows = [[f"exit {p['exit']}", p["train_accuracy"], p["test_accuracy"], p["train_accuracy"] - p["test_accuracy"],
             p["flops"], p["flops_fraction"]] for p in target["per_exit"]]
    van = results["models"].get("vanilla-target")
    if van:
        v = van["per_exit"][-1]
        rows.append(["vanilla", v["train_accuracy"], v["test_accuracy"], v["train_accuracy"] - v["test_accuracy"],
                     v["flops"], 1.0])
    dep = target.get("deployment") or {}
    parts.append(_table(["model", "train acc", "test acc", "gap", "FLOPs", "FLOPs fraction"], rows))
    parts.append(f"<p>Deployed with early exit (τ = {_fmt(target['deployed_threshold'])}): accuracy "
                 f"{_fmt(dep.get('member_accuracy'))} on members and {_fmt(dep.get('nonmember_accuracy'))} on "
                 f"non-members (the final exit alone: {_fmt(target['final_exit'].get('train_accuracy'))} / "
                 f"{_fmt(target['final_exit'].get('test_accuracy'))}), at "
                 f"{_fmt(results['leakage']['mean_flops_fraction'])} of full-depth FLOPs on average.</p>")
    rule = target.get("tau_rule") or {}
    if rule.get("rule") == "vanilla":
        parts.append(f"<p class='muted'>The paper's τ rule (cheapest τ whose validation accuracy is within "
                     f"{_fmt(cfg['target']['tolerance'])} of the vanilla model's {_fmt(rule.get('vanilla_accuracy'))}) "
                     f"picks τ = {_fmt(rule.get('tau'))}"
                     + ("; this audit deploys the configured τ instead." if target.get("threshold_source") == "config"
                        else ".") + "</p>")

    parts.append("<h2>Exit distribution: members vs non-members</h2>")
    parts.append(_img("exit_distribution", figures, "exit distribution"))
    d = results["leakage"]
    parts.append(_table(["exit", "members", "non-members", "member share"],
                        [[f"exit {e}", d["members_per_exit"][e], d["nonmembers_per_exit"][e],
                          d["member_share_per_exit"][e]] for e in range(len(d["members_per_exit"]))]))

    parts.append("<h2>Loss distributions and JS divergence by exit</h2>")
    parts.append(_img("loss", figures, "loss distributions and JS divergence"))
    parts.append(_table(["exit", "JS divergence", "shuffled-label baseline", "members/non-members", "permutation p"],
                        [[f"exit {row['exit']}", row["value"], row["baseline"], row["n"], row["p"]]
                         for row in _js_rows(results["leakage"])]))
    parts.append("<p class='muted'>An exit's divergence means something only when it clearly exceeds its baseline "
                 "(the same estimator with member labels shuffled within the exit); exits with too few members or "
                 "non-members get none.</p>")

    st = results["stealing"]
    parts.append("<h2>Exit stealing from response times</h2>")
    parts.append(_img("latency", figures, "latency density with stolen exit boundaries"))
    qp = st.get("query_planning", {})
    rows = []
    for name, e in (st.get("stealers") or {}).items():
        if "accuracy" not in e:
            continue
        label = STEALER_TEXT.get(name, name) + (" — used by adversary 2" if name == st.get("chosen") else "")
        rows.append([label, e["balanced_accuracy"], e["balanced_chance"], e["accuracy"], e["chance"],
                     e["predicted_exits_used"], ", ".join(_fmt(x, 2) for x in e["per_exit_recall"])])
    parts.append(_table(["stealer", "balanced accuracy", "chance (1/K used)", "accuracy", "chance (majority exit)",
                         "exits predicted", "recall per exit"], rows))
    clean = ", ".join(_fmt(t, 3) for t in qp.get("clean_times_ms", []))
    parts.append(f"<p class='muted'>Clean time per exit (ms): {clean}; "
                 f"per-sample noise σ {_fmt(qp.get('noise_sigma_ms'), 3)} ms; queries per sample for 95% separation of "
                 f"the closest exits (paper Eq. 1): {_fmt(qp.get('queries_95'))}.</p>")

    parts.append("<h2>Membership attacks: original vs hybrid</h2>")
    parts.append(_img("roc", figures, "ROC curves, log-log"))
    parts.append(_img("asr", figures, "attack success original vs hybrid"))
    for key, adv in sorted((results.get("adversaries") or {}).items()):
        parts.append(f"<h3>Adversary {key}: {html.escape(adv['description'])}</h3>")
        parts.append(f"<p class='muted'>exit source: {html.escape(str(adv['exit_source']))}; observed-exit accuracy "
                     f"{_fmt(adv.get('exit_accuracy'))}</p>")
        rows = []
        for name, e in adv["attacks"].items():
            if "error" in e:
                rows.append([name, "failed: " + e["error"], "", "", "", ""])
                continue
            rows.append([name, _ci(e, "auc"), auc_reading(e), _ci(e, "balanced_accuracy"), _low_fpr(e, "0.01"),
                         _low_fpr(e, "0.001")])
        parts.append(_table(["attack", "AUC [95% CI]", "reading", "ASR (balanced acc.) [95% CI]",
                             "TPR@1% FPR [exact CI]", "TPR@0.1% FPR [exact CI]"], rows))
        if any(r[2] == "inverted" for r in rows):
            parts.append(f"<p class='muted'>{html.escape(INVERTED_NOTE)}</p>")
        prs = [p for p in adv["pairs"] if p.get("paired")]
        best = adv.get("best_hybrid_vs_best_original")
        if best and best.get("paired") and not any(
                (p["hybrid"], p["original"]) == (best["hybrid"], best["original"]) for p in prs):
            prs.append({**best, "label": f"best hybrid {best['hybrid']} − best original {best['original']}"})
        if prs:
            parts.append(_table(["hybrid vs its original", "AUC difference [paired 95% CI]", "significant"], [
                [p.get("label") or f"{p['hybrid']} − {p['original']}",
                 f"{p['paired']['auc']['difference']:+.3f} [{p['paired']['auc']['ci'][0]:+.3f}, "
                 f"{p['paired']['auc']['ci'][1]:+.3f}]", "yes" if p["paired"]["auc"]["significant"] else "no"]
                for p in prs]))
    if results.get("vanilla"):
        rows = [[n, _ci(e, "auc"), _ci(e, "balanced_accuracy")] for n, e in results["vanilla"]["attacks"].items()
                if "error" not in e]
        parts.append("<h3>Vanilla (1-exit) baseline, original attacks</h3>")
        parts.append(_table(["attack", "AUC [95% CI]", "ASR [95% CI]"], rows))

    sweep = results.get("tau_sweep")
    if sweep:
        parts.append("<h2>Does early exit leak more or less than the vanilla model? The τ sweep</h2>")
        parts.append(f"<p>The paper's finding: {html.escape(PAPER_FINDING)} Whether it holds depends on the "
                     "threshold τ; each τ below re-deploys both bundles in-process (exits exposed, adversary 1) and "
                     "re-runs the attacks fitted on the shadow. The red line marks the deployed τ.</p>")
        parts.append(_img("tau_sweep", figures, "leakage and cost vs tau"))
        ref = (sweep.get("reference", {}).get("vanilla") or {}).get("best_original_auc")
        rows = [[r["tau"], r["best_original_auc"], r["best_hybrid_auc"], r["exit_only_auc"], r["mean_flops_fraction"],
                 r["accuracy_members"], r["accuracy_nonmembers"]] for r in sweep["rows"]]
        parts.append(_table(["τ", "best original AUC", "best hybrid AUC", "exit-only AUC", "mean FLOPs fraction",
                             "accuracy (members)", "accuracy (non-members)"], rows))
        parts.append(f"<p class='muted'>Vanilla model, best original attack AUC: {_fmt(ref)}; the multi-exit model at "
                     f"full depth: {_fmt(sweep['reference']['full_depth']['best_original_auc'])}.</p>")

    block = results.get("defenses")
    if block:
        from mexit.audit.report_defense import render_defense_section

        shown = {"defense_frontier": figures["defense_frontier"]} if "defense_frontier" in figures else {}
        parts.append(render_defense_section(block, shown))
    live = results.get("live")
    if live:
        off = live.get("offline_prediction") or {}
        parts.append(_table([f"live: {live['label']}", "measured live", "predicted offline"], [
            ["oracle stealer, balanced accuracy", live.get("oracle_balanced_accuracy"),
             off.get("oracle_balanced_accuracy")],
            ["exit-ranking AUC [95% CI] (0.5: the exits' order does not show)",
             _with_ci(live.get("exit_ranking_auc"), live.get("exit_ranking_auc_ci")), off.get("exit_ranking_auc")],
            ["mean added latency (ms)", live.get("mean_added_ms"), off.get("mean_added_ms")]]))
        note = served_defense_note(live.get("served_defense"))
        if note:
            parts.append(f"<p class='muted'>{html.escape(note)}</p>")

    parts.append("<h2>Run</h2>")
    parts.append(_table(["stage", "seconds", "cached"], [[n, t["seconds"], "yes" if t["cached"] else "no"]
                                                        for n, t in results["timings"].items()]))
    versions = results["versions"].get("versions", {})
    parts.append(f"<p class='muted'>wall time {results['wall_seconds']:.1f} s; "
                 f"python {results['versions'].get('python')}; "
                 + ", ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in versions.items()) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(run_dir: str | Path) -> Path:
    """(Re)write ``run_dir/report.html`` from ``results.json`` and the artifacts it names; return its path."""
    from mexit.audit.results import REPORT_FILE, load_results

    run_dir = Path(run_dir)
    results = load_results(run_dir)
    for name, rel in results.get("artifacts", {}).items():
        if rel and name in ("target_signals", "target_owner") and not (run_dir / rel).is_file():
            raise UserError(f"{run_dir / rel} is missing; re-run `mexit audit` with the same config and --out to "
                            f"restore it")
    figures = render_figures(results, run_dir)
    path = run_dir / REPORT_FILE
    atomic_write_bytes(path, render_html(results, figures).encode("utf-8"))
    log.info("report written to %s", path)
    return path
