"""The report's defense section: the frontier of :func:`mexit.audit.defense_eval.evaluate_defenses` for a reader.

:func:`render_defense_section` turns the results' defense block into an HTML fragment — the verdict in
words, the rule, the frontier table and two figures embedded as ``data:image/png;base64`` (matplotlib, Agg):
latency cost against exit-stealing protection (Bayes bound, oracle, shipped stealers, chance 1/K), and the
membership gain with its paired bootstrap interval. It reads only the JSON block, so a report can be
re-rendered from ``results.json`` without the recordings. A figure that fails to draw is logged and
replaced by a one-line note, so the rest of the report still renders.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from typing import Any

from mexit.audit.figures import png_base64

log = logging.getLogger(__name__)

_FAMILY_STYLE = {"none": ("black", "o"), "timeguard": ("#1f77b4", "s"), "padding": ("#d62728", "D"),
                 "optimal": ("#2ca02c", "^")}


def _short(row: dict[str, Any]) -> str:
    """A compact point label: σ for TimeGuard, ε for the optimal schedule, the quantile for padding."""
    p = row.get("params") or {}
    if row["defense"] == "timeguard":
        return f"σ={p.get('sigma_ms'):g}"
    if row["defense"] == "optimal":
        return f"ε={p.get('epsilon'):g}"
    if row["defense"] == "padding":
        return f"p{100 * p.get('quantile', 0):g}"
    return "none"


def _fig_protection(block: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    rows = block["rows"]
    chance = block["chance_balanced"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    ax = axes[0]
    for fam, (color, marker) in _FAMILY_STYLE.items():
        pts = sorted((r for r in rows if r["defense"] == fam), key=lambda r: r["mean_added_ms"])
        if not pts:
            continue
        x = [max(r["mean_added_ms"], 1e-3) for r in pts]
        ax.plot(x, [r["bayes_bound"] for r in pts], color=color, marker=marker, lw=1.2, label=f"{fam}: Bayes bound")
        ax.scatter(x, [r["oracle_balanced_accuracy"] for r in pts], color=color, marker=marker, facecolors="none",
                   s=40, label=f"{fam}: oracle")
        for i, r in enumerate(pts):  # alternate label offsets so neighbouring points do not overlap
            ax.annotate(_short(r), (x[i], r["bayes_bound"]), xytext=(4, 6 if i % 2 else -10),
                        textcoords="offset points", fontsize=6, color=color)
    ax.axhline(chance, color="grey", ls=":", lw=0.9)
    ax.axhline(chance + 0.05, color="grey", ls="--", lw=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("mean added latency (ms, log)")
    ax.set_ylabel("exit stealing, balanced accuracy")
    ax.set_title(f"Protection vs cost (dotted: 1/K = {chance:.2f}; dashed: +0.05)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    ax = axes[1]
    labelled = set()
    for i, r in enumerate(rows):
        g = r.get("hybrid_gain")
        if g is None:
            continue
        color, marker = _FAMILY_STYLE.get(r["defense"], ("grey", "x"))
        err = [[g["value"] - g["ci"][0]], [g["ci"][1] - g["value"]]] if g.get("ci") else None
        ax.errorbar([max(r["p99_added_ms"], 1e-3)], [g["value"]], yerr=err, color=color, marker=marker, capsize=2,
                    ls="none", label=None if r["defense"] in labelled else r["defense"])
        labelled.add(r["defense"])
        ax.annotate(_short(r), (max(r["p99_added_ms"], 1e-3), g["value"]), xytext=(4, 6 if i % 2 else -10),
                    textcoords="offset points", fontsize=6, color=color)
    ax.axhline(0.0, color="grey", ls=":", lw=0.9)
    ax.axhline(0.01, color="grey", ls="--", lw=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("p99 added latency (ms, log)")
    ax.set_ylabel("best hybrid − best original AUC")
    ax.set_title("Membership gain from the stolen exit (95% paired bootstrap)", fontsize=9)
    if labelled:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no membership attacks evaluated", ha="center", transform=ax.transAxes, color="grey")
    return fig


def defense_figures(block: dict[str, Any]) -> dict[str, str]:
    """The section's figures as base64 PNG by name; one that fails is logged and left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    makers: dict[str, Callable[[], Any]] = {"defense_frontier": lambda: _fig_protection(block)}
    out: dict[str, str] = {}
    for name, make in makers.items():
        try:
            out[name] = png_base64(make())
        except Exception:  # a figure must not take the report down with it
            log.exception("defense figure %s could not be drawn; left out of the report", name)
    return out


def _num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _table(block: dict[str, Any]) -> str:
    head = ("<tr><th>defense</th><th>mean / p99 added (ms)</th><th>Bayes bound</th><th>oracle ⁽¹⁾</th>"
            "<th>best shipped stealer</th><th>exit-ranking AUC</th><th>hybrid gain [95% CI]</th>"
            "<th>meets rule</th></tr>")
    rec = (block.get("recommended") or {}).get("label")
    body = []
    for r in block["rows"]:
        g = r.get("hybrid_gain")
        gain = "—" if g is None else f"{g['value']:+.3f}" + (
            f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" if g.get("ci") else "")
        star = " ★" if r["label"] == rec else ""
        body.append(
            f"<tr><td>{html.escape(r['label'])}{star}</td><td>{r['mean_added_ms']:.2f} / {r['p99_added_ms']:.2f}</td>"
            f"<td>{_num(r['bayes_bound'])}</td><td>{_num(r['oracle_balanced_accuracy'])}</td>"
            f"<td>{_num(r['best_shipped_balanced_accuracy'])}</td><td>{_num(r['exit_ranking_auc'])}</td>"
            f"<td>{gain}</td><td>{'yes' if r.get('meets') else 'no'}</td></tr>")
    return f'<table class="defense-frontier">{head}{"".join(body)}</table>'


def render_defense_section(block: dict[str, Any] | None, figures: dict[str, str] | None = None) -> str:
    """The defense section as an HTML fragment (empty string when the results hold no defense block).

    ``figures`` default to :func:`defense_figures` of the block; pass them to reuse figures already drawn.
    """
    if not block:
        return ""
    figs = defense_figures(block) if figures is None else figures
    chance = block["chance_balanced"]
    parts = ["<section id='defenses'><h2>Timing defenses against the strongest adversary</h2>",
             f"<p><strong>{html.escape(block['verdict'])}</strong></p>",
             f"<p>Rule: {html.escape(block['rule'])}. Balanced accuracy is over the {len(block['exits_in_use'])} "
             f"exits in use (chance 1/K = {chance:.3f}), not against the majority exit's share.</p>",
             _table(block)]
    if "defense_frontier" in figs:
        parts.append(f'<figure><img id="fig-defense_frontier" alt="defense frontier" '
                     f'src="data:image/png;base64,{figs["defense_frontier"]}"></figure>')
    else:
        parts.append("<p><em>The frontier figure could not be drawn (see the log).</em></p>")
    skipped = block.get("skipped") or []
    if skipped:
        items = "".join(f"<li>{html.escape(s['label'])}: {html.escape(s['reason'])}</li>" for s in skipped)
        parts.append(f"<p>Not evaluated:</p><ul>{items}</ul>")
    parts.append(f"<p><small>⁽¹⁾ {html.escape(block['oracle_label'])}. {html.escape(block['note'])}.</small></p>")
    parts.append("</section>")
    return "\n".join(parts)
