"""The timing-defense frontier on a finished audit's recorded latencies, checked against issue 12's goals.

Loads the target and shadow signals, keys and dataset of an audit run directory, fits the hybrid attacks on
the shadow (as the audit does), scores the original attacks on the target, and runs
:func:`mexit.audit.defense_eval.evaluate_defenses` over no defense, a TimeGuard σ grid, padding (p99.9)
and the optimal schedule over an ε grid. Writes the frontier and the goal checks as JSON:

    nice -n 10 python benchmarks/defense_frontier.py --run-dir /tmp/def/audit \\
        --out benchmarks/results/defense_frontier_digits.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.attacks.mia import ATTACKS, get_attack
from mexit.attacks.signals import Signals
from mexit.audit.defense_eval import DEFAULT_EPSILONS, DEFAULT_SIGMAS_MS, default_defenses, evaluate_defenses
from mexit.data import load_dataset
from mexit.defense import load_key
from mexit.errors import UserError


def _one(run_dir: Path, pattern: str) -> Path:
    found = sorted(run_dir.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} under {run_dir}: run `mexit audit --out {run_dir}` first")
    return found[-1]


def _attacks(names: list[str], shadow: Signals, target: Signals, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hybrid attacks fitted on the shadow (exits known), and the original attacks' scores on the target."""
    sv = shadow.with_exits(shadow.true_exit, "shadow-known")
    hybrids: dict[str, Any] = {}
    originals: dict[str, np.ndarray] = {}
    for name in names:
        try:
            attack = get_attack(name, seed=seed).fit(sv)
            if ATTACKS[name].hybrid:
                hybrids[name] = attack
            else:
                originals[name] = np.asarray(attack.score(target), dtype=np.float64)
        except UserError as exc:
            print(f"attack {name} left out: {exc}")
    return hybrids, originals


def goals(res: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's goals on this frontier (ratios from the same run)."""
    chance = res["chance_balanced"]
    rows = res["rows"]
    pad = next(r for r in rows if r["defense"] == "padding")
    tg_meet = [r for r in rows if r["defense"] == "timeguard" and r["meets"]]
    opt_meet = [r for r in rows if r["defense"] == "optimal" and r["meets"]]
    tg = min(tg_meet, key=lambda r: r["params"]["sigma_ms"]) if tg_meet else None
    opt = min(opt_meet, key=lambda r: r["mean_added_ms"]) if opt_meet else None
    gaps = {r["label"]: r["oracle_balanced_accuracy"] - r["bayes_bound"] for r in rows}
    out: dict[str, Any] = {
        "padding_oracle_within_0.03": pad["oracle_balanced_accuracy"] <= chance + 0.03,
        "padding_ranking_auc_le_0.55": (pad["exit_ranking_auc"] or 0.5) <= 0.55,
        "timeguard_smallest_meeting_sigma_ms": None if tg is None else tg["params"]["sigma_ms"],
        "optimal_cheapest_meeting": None if opt is None else opt["label"],
        "oracle_minus_bayes": gaps,
        "bayes_vs_oracle_within_0.03": all(abs(v) <= 0.03 for v in gaps.values()),
    }
    if opt is not None:
        out["optimal_mean_le_padding"] = opt["mean_added_ms"] <= pad["mean_added_ms"] + 1e-9
        out["optimal_p99_le_padding"] = opt["p99_added_ms"] <= pad["p99_added_ms"] + 1e-9
        if tg is not None:
            out["optimal_over_timeguard_mean"] = opt["mean_added_ms"] / tg["mean_added_ms"]
            out["optimal_mean_le_half_timeguard"] = opt["mean_added_ms"] <= 0.5 * tg["mean_added_ms"]
    return out


def table(res: dict[str, Any]) -> str:
    """The frontier as a markdown table."""
    lines = ["| defense | mean / p99 added ms | Bayes | oracle | best shipped | ranking AUC | hybrid gain [CI] | "
             "meets |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        g = r["hybrid_gain"]
        ci = f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" if g is not None and g["ci"] else ""
        gain = "—" if g is None else f"{g['value']:+.3f}{ci}"
        rank = "—" if r["exit_ranking_auc"] is None else f"{r['exit_ranking_auc']:.3f}"
        lines.append(f"| {r['label']} | {r['mean_added_ms']:.2f} / {r['p99_added_ms']:.2f} | {r['bayes_bound']:.3f} | "
                     f"{r['oracle_balanced_accuracy']:.3f} | {r['best_shipped_balanced_accuracy']:.3f} | {rank} | "
                     f"{gain} | {'yes' if r['meets'] else 'no'} |")
    return "\n".join(lines)


def synthetic(n: int, repeats: int, seed: int) -> tuple[Signals, Signals, np.ndarray, np.ndarray]:
    """A quiet recording shaped like the default audit's: its exit shares and clean times, gamma jitter."""
    rng = np.random.default_rng(seed)
    shares, clean_ms = np.array([0.79, 0.03, 0.03, 0.15]), np.array([0.90, 1.17, 1.70, 1.94])

    def one(off: int) -> tuple[Signals, np.ndarray]:
        exits = rng.choice(4, n, p=shares)
        lat_ms = clean_ms[exits][:, None] * (1 + rng.normal(0, 0.03, (n, 1))) + rng.gamma(2.0, 0.03, (n, repeats))
        sig = Signals(member=np.arange(n) % 2 == 0, true_label=np.zeros(n, np.int64), pred_label=np.zeros(n, np.int64),
                      sample_index=np.arange(off, off + n), num_exits=4, num_classes=2, true_exit=exits,
                      latency_ns=(lat_ms * 1e6).astype(np.int64))
        return sig, rng.random((n, 16)).astype(np.float32)

    (t, xt), (s, xs) = one(0), one(n)
    return t, s, xt, xs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="a finished `mexit audit --out` directory")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="instead of an audit: a quiet synthetic recording of N samples shaped like the default audit")
    ap.add_argument("--repeats", type=int, default=10, help="repeats per sample of the synthetic recording")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/defense_frontier.json"))
    ap.add_argument("--sigmas-ms", type=float, nargs="+", default=list(DEFAULT_SIGMAS_MS))
    ap.add_argument("--epsilons", type=float, nargs="+", default=list(DEFAULT_EPSILONS))
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--calibration", choices=["all", "min"], default="all",
                    help="calibrate on every recorded repeat, or on each sample's fastest (client-side noise removed)")
    args = ap.parse_args()

    if args.synthetic:
        seed, dataset, stealer = 0, f"synthetic-{args.synthetic}x{args.repeats}", "supervised"
        target, shadow, x_t, x_s = synthetic(args.synthetic, args.repeats, seed)
        kind, key, shadow_key = "tabular", bytes(range(32)), bytes(range(1, 33))
        hybrids, originals = {}, {}
    elif args.run_dir is not None:
        cfg = json.loads((args.run_dir / "audit.json").read_text())["config"]
        seed, dataset, stealer = int(cfg.get("seed", 0)), cfg["dataset"]["name"], cfg["attacks"].get("stealer",
                                                                                                     "supervised")
        target = Signals.load(_one(args.run_dir, "collect-target-*/signals.npz"))
        shadow = Signals.load(_one(args.run_dir, "collect-shadow-*/signals.npz"))
        ds = load_dataset(dataset, cfg["dataset"].get("data_root"))
        x_t, x_s, kind = ds.inputs(target.sample_index), ds.inputs(shadow.sample_index), ds.kind
        key, shadow_key = load_key(args.run_dir / "timeguard.key"), load_key(args.run_dir / "shadow-timeguard.key")
        hybrids, originals = _attacks(cfg["attacks"]["names"], shadow, target, seed)
    else:
        raise SystemExit("give --run-dir or --synthetic N")
    start = time.perf_counter()
    res = evaluate_defenses(target=target, shadow=shadow, x_target=x_t, x_shadow=x_s, kind=kind, key=key,
                            shadow_key=shadow_key, defenses=default_defenses(args.sigmas_ms, args.epsilons),
                            hybrid_attacks=hybrids, original_scores=originals, stealer=stealer, seed=seed,
                            n_bootstrap=args.bootstrap, calibration=args.calibration)
    elapsed = time.perf_counter() - start
    out = {"benchmark": "defense_frontier", "run_dir": None if args.run_dir is None else str(args.run_dir),
           "dataset": dataset,
           "command": "benchmarks/defense_frontier.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                  vars(args).items()),
           "seed": seed, "elapsed_s": elapsed, "frontier": res, "goals": goals(res), "table": table(res),
           "note": "offline on the audit's recorded (loopback HTTP) latencies; machine shared with other jobs",
           "provenance": provenance()}
    atomic_write_json(args.out, out)
    print(table(res))
    print(res["verdict"])
    print(json.dumps(out["goals"], indent=1))
    print(f"wrote {args.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
