"""Tabulate ``mexit attack`` results of several runs (e.g. 1..6 exits) into one markdown table + JSON.

    python benchmarks/tabulate_attacks.py RESULT_DIR [RESULT_DIR ...] --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mexit._io import atomic_write_bytes, atomic_write_json


def _cell(block: dict, name: str, metric: str) -> str:
    entry = block["attacks"].get(name)
    if not entry or "error" in entry:
        return "–"
    m = entry[metric]
    return f"{m['value']:.3f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]" if m.get("ci") else f"{m['value']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    rows, records = [], []
    header = ("| exits | deployed acc. members / non-members (final exit train / test) | exit shares (members / "
              "non-members) | loss JS div. per exit (95 % permutation baseline) | stealing, chosen stealer: "
              "balanced / accuracy (chance 1/K / majority exit) | score ASR | score AUC | adv.1 score-hybrid AUC | "
              "adv.2 score-hybrid AUC | "
              "adv.3 score-hybrid AUC (adv.3 exits) | exit-only AUC |")
    rows.append(header)
    rows.append("|" + "---|" * (header.count("|") - 1))
    for d in args.dirs:
        r = json.loads((d / "results.json").read_text())
        setup, leak, steal = r["setup"], r.get("leakage", {}), r.get("exit_stealing", {})
        a1, a2, a3 = (r["adversaries"].get(k) for k in ("1", "2", "3"))
        acc = setup.get("accuracy", {})
        dep, fin = acc.get("deployed") or {}, acc.get("final_exit") or {}
        accs = (f"{dep.get('train_accuracy', float('nan')):.3f} / {dep.get('test_accuracy', float('nan')):.3f} "
                f"({fin.get('train_accuracy', float('nan')):.3f} / {fin.get('test_accuracy', float('nan')):.3f})")
        mem, non = leak.get("members_per_exit", []), leak.get("nonmembers_per_exit", [])
        shares = "/".join(str(m) for m in mem) + " / " + "/".join(str(n) for n in non) if mem else "–"
        js = ", ".join("–" if e.get("js") is None else f"{e['js']:.2f} (baseline {e['baseline_q95']:.2f})"
                       for e in leak.get("loss_js_divergence_per_exit", []))
        chosen = steal.get("stealers", {}).get(steal.get("chosen", ""), {})
        st = (f"{steal['chosen']}: {chosen['balanced_accuracy']:.3f} / {chosen['accuracy']:.3f} "
              f"({chosen['balanced_chance']:.3f} / {chosen['chance']:.3f})") if chosen else "–"
        adv3 = f"{_cell(a3, 'score-hybrid', 'auc')} ({a3['exit_source']}, {a3['exit_accuracy']:.3f})" if a3 else "–"
        rows.append(
            f"| {setup['exits']} | {accs} | {shares} | {js} | {st} | {_cell(a1, 'score', 'balanced_accuracy')} | "
            f"{_cell(a1, 'score', 'auc')} | {_cell(a1, 'score-hybrid', 'auc')} | {_cell(a2, 'score-hybrid', 'auc')} | "
            f"{adv3} | {_cell(a1, 'exit-only', 'auc')} |")
        records.append({"dir": str(d), "setup": setup, "leakage": leak, "exit_stealing": steal,
                        "adversaries": {k: {"exit_source": blk.get("exit_source"),
                                            "exit_accuracy": blk.get("exit_accuracy"), "pairs": blk.get("pairs"),
                                            "attacks": {n: {m: v[m] for m in ("auc", "balanced_accuracy") if m in v}
                                                        for n, v in blk["attacks"].items() if "error" not in v}}
                                        for k, blk in r["adversaries"].items()}})
    atomic_write_bytes(args.out.parent / (args.out.name + ".md"), ("\n".join(rows) + "\n").encode())
    atomic_write_json(args.out.parent / (args.out.name + ".json"), records)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
