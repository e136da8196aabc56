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


def majority_exit_share(members_per_exit: list[int], nonmembers_per_exit: list[int]) -> float:
    """Chance level of exit stealing: always guessing the most common true exit of the queried samples."""
    total = [m + n for m, n in zip(members_per_exit, nonmembers_per_exit, strict=True)]
    return max(total) / max(sum(total), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    rows, records = [], []
    header = ("| exits | train/test acc (final exit) | exit shares (members / non-members) | loss JS div. per exit | "
              "stealing acc aligned KDE / blind KDE / logistic | stealing chance (majority exit) | "
              "score ASR | score AUC | label-only ASR | adv.1 score-hybrid AUC | adv.2 "
              "score-hybrid AUC | adv.1 label-only-hybrid ASR | exit-only AUC |")
    rows.append(header)
    rows.append("|" + "---|" * (header.count("|") - 1))
    for d in args.dirs:
        r = json.loads((d / "results.json").read_text())
        setup, leak, steal = r["setup"], r.get("leakage", {}), r.get("exit_stealing", {})
        a1, a2 = r["adversaries"].get("1"), r["adversaries"].get("2")
        mem, non = leak.get("members_per_exit", []), leak.get("nonmembers_per_exit", [])
        shares = "/".join(str(m) for m in mem) + " / " + "/".join(str(n) for n in non) if mem else "–"
        js = ", ".join("–" if v is None else f"{v:.2f}" for v in leak.get("loss_js_divergence_per_exit", []))
        st = " / ".join(f"{steal[k]['accuracy']:.3f}" if "accuracy" in steal.get(k, {}) else "–"
                        for k in ("kde", "kde_blind", "supervised"))
        chance = f"{majority_exit_share(mem, non):.3f}" if mem else "–"
        rows.append(
            f"| {setup['exits']} | {setup['train_accuracy']:.3f} / {setup['test_accuracy']:.3f} | {shares} | {js} | "
            f"{st} | {chance} | {_cell(a1, 'score', 'balanced_accuracy')} | {_cell(a1, 'score', 'auc')} | "
            f"{_cell(a1, 'label-only', 'balanced_accuracy')} | {_cell(a1, 'score-hybrid', 'auc')} | "
            f"{_cell(a2, 'score-hybrid', 'auc')} | {_cell(a1, 'label-only-hybrid', 'balanced_accuracy')} | "
            f"{_cell(a1, 'exit-only', 'auc')} |")
        records.append({"dir": str(d), "setup": setup, "leakage": leak, "exit_stealing": steal,
                        "adversaries": {k: {n: {m: v[m] for m in ("auc", "balanced_accuracy") if m in v}
                                            for n, v in blk["attacks"].items() if "error" not in v}
                                        for k, blk in r["adversaries"].items()}})
    atomic_write_bytes(args.out.with_suffix(".md"), ("\n".join(rows) + "\n").encode())
    atomic_write_json(args.out.with_suffix(".json"), records)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
