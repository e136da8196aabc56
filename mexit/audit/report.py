"""The audit report: a self-contained ``report.html`` (figures embedded as PNG) and a terminal summary.

:func:`build_report` reads only ``results.json`` and the artifacts it names (signals, owner-side exits
and losses), so ``mexit report RUN_DIR`` rebuilds the page without re-running anything. The page opens
with the verdict — does the deployment leak through its exits and response times, how much better are
the hybrid attacks, and what TimeGuard costs to stop it — followed by the evidence, figure by figure.
Figures are drawn with matplotlib's Agg backend and embedded as ``data:image/png;base64`` images; the
page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_bytes
from mexit.audit.defense_eval import stealing_accuracy
from mexit.errors import UserError

log = logging.getLogger(__name__)

FIGURES = ("accuracy_flops", "exit_distribution", "loss", "latency", "roc", "asr", "timeguard_frontier")
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# ------------------------------------------------------------------------------------------ numbers
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
    best_steal = max(st["kde"]["accuracy"], st["supervised"]["accuracy"], st.get("kde_blind", {}).get("accuracy", 0.0))
    leaks = best_steal > st["chance"] + 0.05
    lines.append(
        f"{'Leaks' if leaks else 'No clear leak'} through response times: exits stolen with "
        f"{best_steal:.2f} accuracy (KDE {st['kde']['accuracy']:.2f}, supervised {st['supervised']['accuracy']:.2f}; "
        f"guessing the most common exit gives {st['chance']:.2f})."
    )
    adv = _headline_adversary(results)
    if adv and adv.get("best_hybrid") and adv.get("best_original"):
        h, o = adv["best_hybrid"], adv["best_original"]
        lines.append(
            f"Adversary {adv['adversary']} ({adv['description']}): best hybrid attack {h['attack']} AUC {h['auc']:.2f} "
            f"vs {o['auc']:.2f} for the best original attack {o['attack']} (balanced accuracy "
            f"{h['balanced_accuracy']:.2f} vs {o['balanced_accuracy']:.2f})."
        )
    tg = results["timeguard"]
    rec = tg["recommended"]
    row = rec["row"]
    rel = row.get("relative_mean_increase")
    lines.append(
        f"TimeGuard σ={rec['sigma_ms']:g} ms {'brings' if rec['met'] else 'is the largest σ tried and brings'} "
        f"exit stealing to {stealing_accuracy(row):.2f} (chance {tg['chance']:.2f})"
        + (f" and the best hybrid attack to {row['best_hybrid_balanced_accuracy']:.2f} balanced accuracy"
           if row.get("best_hybrid_balanced_accuracy") is not None else "")
        + f" at {row['mean_added_ms']:+.3f} ms mean latency ({_pct(rel)}); constant-time padding costs "
          f"{tg['padding']['mean_added_ms']:+.3f} ms ({_pct(tg['padding']['relative_mean_increase'])})."
        + ("" if rec["met"] else " No σ of the grid met the rule: extend timeguard.sigma_grid_ms.")
        + (" Without any defense, exit stealing already does no better than guessing here: TimeGuard is not "
           "needed for this deployment (the smallest σ is shown)." if rec.get("needed") is False else "")
        + (f" Careful with small σ: at σ = {', '.join(f'{v:g}' for v in tg['easier_than_undefended_sigmas_ms'])} ms "
           "exit stealing is *easier* than without TimeGuard (releasing at the calibrated exit time plus a small "
           "delay removes the natural jitter that hid the exits)." if tg.get("easier_than_undefended_sigmas_ms")
           else "")
    )
    live = results.get("live")
    if live:
        lines.append(
            f"Confirmed live at σ={live['sigma_ms']:g} ms: stealing "
            f"{stealing_accuracy(live):.2f} accuracy, mean latency "
            f"{live['mean_added_ms']:+.3f} ms ({_pct(live.get('relative_mean_increase'))}) against an undefended "
            f"recording made just before it."
        )
    van = results.get("vanilla")
    if van and van.get("best_original") and adv and adv.get("best_original"):
        lines.append(
            f"Vanilla (1-exit) baseline: best original attack AUC {van['best_original']['auc']:.2f} vs "
            f"{adv['best_original']['auc']:.2f} on the multi-exit model."
        )
    return lines


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f}%"


def summary_table(results: dict[str, Any]) -> str:
    """A short plain-text summary for the terminal: verdict, attacks per adversary, TimeGuard."""
    out = ["", *verdict(results), ""]
    header = f"{'adversary':<10}{'attack':<20}{'AUC':>8}{'ASR':>8}{'TPR@1%':>9}"
    out.append(header)
    out.append("-" * len(header))
    for key, adv in sorted((results.get("adversaries") or {}).items()):
        for name, entry in adv["attacks"].items():
            if "error" in entry:
                out.append(f"{key:<10}{name:<20}{'failed: ' + entry['error'][:40]:>25}")
                continue
            tpr = entry["tpr_at_fpr"].get("0.01", {}).get("value")
            out.append(f"{key:<10}{name:<20}{_fmt(_val(entry, 'auc')):>8}{_fmt(_val(entry, 'balanced_accuracy')):>8}"
                       f"{_fmt(tpr):>9}")
    tg = results["timeguard"]
    out.append("")
    out.append(f"{'defense':<18}{'kde acc':>9}{'sup acc':>9}{'hybrid ASR':>12}{'+ms mean':>10}")
    for row in [tg["baseline"], *tg["grid"], tg["padding"]]:
        label = "none" if row["policy"] == "none" else "padding" if row["policy"] == "padding" else \
            f"σ={row['sigma_ms']:g} ms"
        if row["policy"] == "timeguard" and row["sigma_ms"] == tg["recommended"]["sigma_ms"]:
            label += " *"
        out.append(f"{label:<18}{row['kde_accuracy']:>9.3f}{row['supervised_accuracy']:>9.3f}"
                   f"{_fmt(row.get('best_hybrid_balanced_accuracy')):>12}{row['mean_added_ms']:>10.3f}")
    out.append("(* recommended)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ figures
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_accuracy_flops(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    target = r["models"]["target"]
    per = target["per_exit"]
    k = np.arange(len(per))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.bar(k - 0.2, [p["train_accuracy"] for p in per], 0.4, label="train (members)", color=_COLORS[0])
    ax.bar(k + 0.2, [p["test_accuracy"] for p in per], 0.4, label="test (non-members)", color=_COLORS[1])
    van = r["models"].get("vanilla-target")
    if van:
        ax.axhline(van["final_exit"]["test_accuracy"], color="k", ls="--", lw=1, label="vanilla test accuracy")
    ax.set_xticks(k, [f"exit {i}" for i in k])
    ax.set_ylabel("accuracy")
    lo = min(min(p["test_accuracy"] for p in per), 0.9)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax2 = ax.twinx()
    ax2.plot(k, [p["flops_fraction"] for p in per], "o-", color=_COLORS[2], label="FLOPs (fraction of full)")
    ax2.set_ylabel("cumulative FLOPs fraction")
    ax2.set_ylim(0, 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.set_title(f"{target['arch']} on {target['dataset']}: accuracy and cost per exit")
    return fig


def _fig_exit_distribution(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    d = r["leakage"]["exit_distribution"]
    m, n = np.asarray(d["members"], float), np.asarray(d["nonmembers"], float)
    k = np.arange(len(m))
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.bar(k - 0.2, m / max(m.sum(), 1), 0.4, label="members", color=_COLORS[0])
    ax.bar(k + 0.2, n / max(n.sum(), 1), 0.4, label="non-members", color=_COLORS[1])
    ax.set_xticks(k, [f"exit {i}" for i in k])
    ax.set_ylabel("share of samples")
    ax.set_title("Where members and non-members leave the target")
    ax.legend(fontsize=8)
    return fig


def _fig_loss(r: dict[str, Any], run_dir: Path) -> Any:
    import matplotlib.pyplot as plt

    with np.load(run_dir / r["artifacts"]["target_owner"]) as z:
        exits, loss, member = z["exit_index"], z["loss"], z["member"].astype(bool)
    k = len(r["leakage"]["loss_js_divergence"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
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
    axes[0].set_title("Loss by exit (solid: members, dashed: non-members)")
    axes[0].legend(fontsize=6, ncol=2)
    js = [np.nan if v is None else v for v in r["leakage"]["loss_js_divergence"]]
    axes[1].bar(np.arange(k), js, color=_COLORS[3])
    axes[1].set_xticks(np.arange(k), [f"exit {i}" for i in range(k)])
    axes[1].set_ylabel("JS divergence (members vs non-members)")
    axes[1].set_title("Loss divergence by exit")
    return fig


def _fig_latency(r: dict[str, Any], run_dir: Path) -> Any:
    import matplotlib.pyplot as plt

    from mexit.attacks.signals import Signals

    t = Signals.load(run_dir / r["artifacts"]["target_signals"])
    lat = t.min_latency_ns() / 1e6
    exits = t.true_exit if t.true_exit is not None else np.zeros(len(lat), dtype=int)
    hi = float(np.quantile(lat, 0.995))
    lo = float(lat.min())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 80)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    data = [np.clip(lat[exits == e], lo, hi) for e in range(t.num_exits)]
    ax.hist(data, bins=bins, stacked=True, density=True, color=[_COLORS[e % 8] for e in range(t.num_exits)],
            label=[f"true exit {e}" for e in range(t.num_exits)], alpha=0.8)
    for i, b in enumerate(r["stealing"]["kde"]["fit"]["boundaries_ms"]):
        ax.axvline(b, color="k", ls="--", lw=1, label="KDE exit boundary" if i == 0 else None)
    ax.set_xlabel("response time, minimum over repeats (ms)")
    ax.set_ylabel("density")
    ax.set_title("Target response times and the exit boundaries stolen from them")
    ax.legend(fontsize=7)
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


def _fig_frontier(r: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    tg = r["timeguard"]
    grid = tg["grid"]
    x = [row["mean_added_ms"] for row in grid]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(x, [row["kde_accuracy"] for row in grid], "o-", color=_COLORS[0], label="exit stealing (KDE)")
    ax.plot(x, [row["supervised_accuracy"] for row in grid], "s-", color=_COLORS[1],
            label="exit stealing (supervised)")
    hyb = [row.get("best_hybrid_balanced_accuracy") for row in grid]
    if any(v is not None for v in hyb):
        ax.plot(x, [np.nan if v is None else v for v in hyb], "^-", color=_COLORS[3],
                label="best hybrid attack (ASR)")
    ax.axhline(tg["chance"], color="grey", ls=":", lw=1, label="stealing chance")
    if tg.get("best_original_balanced_accuracy") is not None:
        ax.axhline(tg["best_original_balanced_accuracy"], color=_COLORS[3], ls=":", lw=1,
                   label="best original attack (ASR)")
    for row in grid:
        ax.annotate(f"σ={row['sigma_ms']:g}", (row["mean_added_ms"], row["supervised_accuracy"]), fontsize=6,
                    xytext=(2, 4), textcoords="offset points")
    rec = tg["recommended"]["row"]
    ax.axvline(rec["mean_added_ms"], color="green", lw=1.2, ls="--", label=f"recommended σ={rec['sigma_ms']:g} ms")
    base = tg["baseline"]
    ax.scatter([0, 0], [base["kde_accuracy"], base["supervised_accuracy"]], marker="D", s=30, color="grey", zorder=5,
               label="no defense")
    pad = tg["padding"]
    ax.scatter([pad["mean_added_ms"]] * 2, [pad["kde_accuracy"], pad["supervised_accuracy"]], marker="X", s=60,
               color="k", zorder=5, label="constant-time padding")
    live = r.get("live")
    if live:
        ax.scatter([live["mean_added_ms"]], [stealing_accuracy(live)], marker="*",
                   s=120, color="green", zorder=6, label="live confirmation")
    ax.set_xlabel("mean added latency (ms)")
    ax.set_ylabel("accuracy / attack success")
    ax.set_ylim(0, 1.02)
    ax.set_title("TimeGuard frontier: what each σ costs and stops")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


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
        "timeguard_frontier": lambda: _fig_frontier(results),
    }
    return {name: _png(make()) for name, make in makers.items()}


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


def _img(name: str, b64: str, alt: str) -> str:
    return f'<figure><img id="fig-{name}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'


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
             f"<p class='muted'>Deployment: {html.escape(cfg['deployment']['mode'])}, exposes "
             f"{html.escape(cfg['deployment']['expose'])}{' and exits' if cfg['deployment']['expose_exit'] else ''}; "
             f"threshold τ={target['deployed_threshold']:.3f} ({html.escape(str(target['threshold_source']))}); "
             f"{cfg['queries']['members']} members + {cfg['queries']['nonmembers']} non-members queried "
             f"{cfg['queries']['repeats']}× each; seed {cfg['seed']}; config {results['config_hash'][:12]}; "
             f"schema {html.escape(results['schema'])}.</p>"]

    parts.append("<h2>Accuracy and cost per exit</h2>")
    parts.append(_img("accuracy_flops", figures["accuracy_flops"], "accuracy and FLOPs per exit"))
    rows = [[f"exit {p['exit']}", p["train_accuracy"], p["test_accuracy"], p["train_accuracy"] - p["test_accuracy"],
             p["flops"], p["flops_fraction"]] for p in target["per_exit"]]
    van = results["models"].get("vanilla-target")
    if van:
        v = van["per_exit"][-1]
        rows.append(["vanilla", v["train_accuracy"], v["test_accuracy"], v["train_accuracy"] - v["test_accuracy"],
                     v["flops"], 1.0])
    dep = target.get("deployment") or {}
    parts.append(_table(["model", "train acc", "test acc", "gap", "FLOPs", "FLOPs fraction"], rows))
    parts.append(f"<p>Deployed with early exit: accuracy {_fmt(dep.get('member_accuracy'))} on members, "
                 f"{_fmt(dep.get('nonmember_accuracy'))} on non-members, at "
                 f"{_fmt(results['leakage']['mean_flops_fraction'])} of full-depth FLOPs on average.</p>")

    parts.append("<h2>Exit distribution: members vs non-members</h2>")
    parts.append(_img("exit_distribution", figures["exit_distribution"], "exit distribution"))
    d = results["leakage"]["exit_distribution"]
    parts.append(_table(["exit", "members", "non-members", "member share"],
                        [[f"exit {e}", d["members"][e], d["nonmembers"][e], d["member_share"][e]]
                         for e in range(len(d["members"]))]))

    parts.append("<h2>Loss distributions and JS divergence by exit</h2>")
    parts.append(_img("loss", figures["loss"], "loss distributions and JS divergence"))

    st = results["stealing"]
    parts.append("<h2>Exit stealing from response times</h2>")
    parts.append(_img("latency", figures["latency"], "latency density with stolen exit boundaries"))
    qp = st.get("query_planning", {})
    parts.append(_table(["stealer", "accuracy", "exits found/used", "per-exit recall"], [
        ["KDE aligned to the shadow's exits (adversary 2)", st["kde"]["accuracy"], st["kde"]["predicted_exits_used"],
         ", ".join(_fmt(x, 2) for x in st["kde"]["per_exit_recall"])],
        *([["KDE blind: exits discovered, numbered by rank (adversary 3)", st["kde_blind"]["accuracy"],
            st["kde_blind"]["fit"]["n_exits"], ", ".join(_fmt(x, 2) for x in st["kde_blind"]["per_exit_recall"])]]
          if "kde_blind" in st else []),
        ["supervised (shadow timings)", st["supervised"]["accuracy"], st["supervised"]["predicted_exits_used"],
         ", ".join(_fmt(x, 2) for x in st["supervised"]["per_exit_recall"])],
        ["chance (most common exit)", st["chance"], "", ""]]))
    clean = ", ".join(_fmt(t, 3) for t in qp.get("clean_times_ms", []))
    parts.append(f"<p class='muted'>Clean time per exit (ms): {clean}; "
                 f"per-sample noise σ {_fmt(qp.get('noise_sigma_ms'), 3)} ms; queries per sample for 95% separation of "
                 f"the closest exits (paper Eq. 1): {_fmt(qp.get('queries_95'))}.</p>")

    parts.append("<h2>Membership attacks: original vs hybrid</h2>")
    parts.append(_img("roc", figures["roc"], "ROC curves, log-log"))
    parts.append(_img("asr", figures["asr"], "attack success original vs hybrid"))
    for key, adv in sorted((results.get("adversaries") or {}).items()):
        parts.append(f"<h3>Adversary {key}: {html.escape(adv['description'])}</h3>")
        parts.append(f"<p class='muted'>exit source: {html.escape(str(adv['exit_source']))}; observed-exit accuracy "
                     f"{_fmt(adv.get('exit_accuracy'))}</p>")
        rows = []
        for name, e in adv["attacks"].items():
            if "error" in e:
                rows.append([name, "failed: " + e["error"], "", "", ""])
                continue
            rows.append([name, _ci(e, "auc"), _ci(e, "balanced_accuracy"),
                         _fmt(e["tpr_at_fpr"].get("0.01", {}).get("value")),
                         _fmt(e["tpr_at_fpr"].get("0.001", {}).get("value"))])
        parts.append(_table(["attack", "AUC [95% CI]", "ASR (balanced acc.) [95% CI]", "TPR@1% FPR",
                             "TPR@0.1% FPR"], rows))
    if results.get("vanilla"):
        rows = [[n, _ci(e, "auc"), _ci(e, "balanced_accuracy")] for n, e in results["vanilla"]["attacks"].items()
                if "error" not in e]
        parts.append("<h3>Vanilla (1-exit) baseline, original attacks</h3>")
        parts.append(_table(["attack", "AUC [95% CI]", "ASR [95% CI]"], rows))

    tg = results["timeguard"]
    parts.append("<h2>TimeGuard: privacy vs latency</h2>")
    parts.append(_img("timeguard_frontier", figures["timeguard_frontier"], "TimeGuard frontier"))
    rows = []
    for row in [tg["baseline"], *tg["grid"], tg["padding"]]:
        names = {"none": "no defense", "padding": "constant-time padding"}
        label = names[row["policy"]] if row["policy"] in names else f"σ = {row['sigma_ms']:g} ms"
        if row["policy"] == "timeguard" and row["sigma_ms"] == tg["recommended"]["sigma_ms"]:
            label += " (recommended)"
        rows.append([label, row["kde_accuracy"], row["supervised_accuracy"], row.get("best_hybrid_auc"),
                     row.get("best_hybrid_balanced_accuracy"), row["mean_added_ms"],
                     _pct(row.get("relative_mean_increase"))])
    parts.append(_table(["defense", "KDE stealing", "supervised stealing", "best hybrid AUC", "best hybrid ASR",
                         "mean added ms", "mean latency"], rows))
    parts.append(f"<p class='muted'>Rule: {html.escape(tg['recommended']['rule'])}. {html.escape(tg['note'])}.</p>")
    live = results.get("live")
    if live:
        off = live["offline_prediction"]
        head = ["live at σ = " + _fmt(live["sigma_ms"], 3) + " ms", "measured live", "predicted offline"]
        parts.append(_table(head, [
            ["KDE stealing accuracy", live["kde_accuracy"], off.get("kde_accuracy")],
            ["supervised stealing accuracy", live["supervised_accuracy"], off.get("supervised_accuracy")],
            ["best hybrid ASR", live.get("best_hybrid_balanced_accuracy"), off.get("best_hybrid_balanced_accuracy")],
            ["mean added latency (ms)", live["mean_added_ms"], off.get("mean_added_ms")]]))

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
    from mexit.audit.pipeline import REPORT_FILE, load_results

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
