"""Claim 8 of the reproduction over several audits: does TimeGuard bring the hybrid attack back to the original?

The paper: "the ASR score of the original attack is the lower bound of the attack performance in both the
original and hybrid attacks" (``paper.txt`` line 396) — with TimeGuard on, the exit stolen from timing should
add nothing. Each ``mexit audit`` run evaluates the defenses offline on its recorded latencies
(``results.json`` → ``defenses.rows``). This reads several runs (one per seed), takes the undefended row and
the cheapest TimeGuard σ that meets the audit's protection rule, and reports per run and as mean ± sd:
the hybrid − original AUC gain (paired interval), the oracle stealer's and the Bayes bound's balanced accuracy
against 1/K, and the mean added latency.

    python benchmarks/timeguard_claim.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/timeguard_claim_location.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import mean_sd  # a sibling script, importable once its folder is on sys.path

from mexit._io import atomic_write_json, provenance


def _row_view(row: dict[str, Any]) -> dict[str, Any]:
    gain = row.get("hybrid_gain") or {}
    return {"label": row["label"], "sigma_ms": row.get("sigma_ms"), "hybrid_gain": gain.get("value"),
            "hybrid_gain_ci": gain.get("ci"), "best_original_auc": gain.get("best_original_auc"),
            "best_hybrid_auc": gain.get("best_hybrid_auc"), "oracle": row.get("oracle_balanced_accuracy"),
            "bayes_bound": row.get("bayes_bound"), "mean_added_ms": row.get("mean_added_ms"),
            "meets": row.get("meets")}


def one_run(run_dir: Path) -> dict[str, Any]:
    """The undefended row and the cheapest protecting TimeGuard row of one audit's defense evaluation."""
    r = json.loads((run_dir / "results.json").read_text())
    d = r["defenses"]
    rows = d["rows"]
    none = next(x for x in rows if x["defense"] == "none")
    guard = sorted((x for x in rows if x["defense"] == "timeguard" and x.get("meets")),
                   key=lambda x: x["mean_added_ms"])
    return {"run": str(run_dir), "seed": r["config"]["seed"], "chance_balanced": d["chance_balanced"],
            "undefended": _row_view(none), "timeguard": _row_view(guard[0]) if guard else None}


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| seed | undefended: hybrid − original AUC | TimeGuard σ (cheapest meeting the rule) | "
             "hybrid − original AUC | oracle / Bayes bound (1/K) | mean added |", "|---|---|---|---|---|---|"]
    for r in runs:
        u, g = r["undefended"], r["timeguard"] or {}
        ci = lambda row: "" if not row.get("hybrid_gain_ci") else (  # noqa: E731
            f" [{row['hybrid_gain_ci'][0]:+.3f}, {row['hybrid_gain_ci'][1]:+.3f}]")
        lines.append(f"| {r['seed']} | {u['hybrid_gain']:+.3f}{ci(u)} | {g.get('sigma_ms', '–')} ms | "
                     f"{g['hybrid_gain']:+.3f}{ci(g)} | {g['oracle']:.3f} / {g['bayes_bound']:.3f} "
                     f"({r['chance_balanced']:.3f}) | +{g['mean_added_ms']:.2f} ms |" if g else
                     f"| {r['seed']} | {u['hybrid_gain']:+.3f}{ci(u)} | none meets the rule | – | – | – |")
    guarded = [r["timeguard"] for r in runs if r["timeguard"]]
    gains = mean_sd([g["hybrid_gain"] for g in guarded], "+.3f")
    judges = f"{mean_sd([g['oracle'] for g in guarded])} / {mean_sd([g['bayes_bound'] for g in guarded])}"
    added = mean_sd([g["mean_added_ms"] for g in guarded], ".2f")
    lines.append(f"| mean ± sd | {mean_sd([r['undefended']['hybrid_gain'] for r in runs], '+.3f')} | | {gains} | "
                 f"{judges} | {added} ms |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished `mexit audit --out` directories")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/timeguard_claim.json"))
    args = ap.parse_args()
    runs = [one_run(d) for d in args.runs]
    md = table(runs)
    atomic_write_json(args.out, {"runs": runs, "table": md, "provenance": provenance(benchmark="timeguard_claim")})
    print(md)


if __name__ == "__main__":
    main()
