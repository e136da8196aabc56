"""Live (in-process) confirmation: each defense serving an audit's real target bundle, judged by the oracle.

Builds every defense through the registry around the audit's exported target bundle
(``build_guarded``: server-side calibration with ``force_exit`` on calibration inputs, as ``mexit serve``
would), queries the audit's target samples one per call, ``--repeats`` times in a fresh random order per
round, and records the *released* latency (:meth:`GuardedRuntime.predict`, what a client in the same process
sees). No HTTP: the server cannot take registry defenses until the lead wires ``--defense``. Reports per
defense the mean/p99 added latency against the undefended runtime measured in the same interleaved rounds,
the overrun share, the oracle's cross-validated balanced accuracy and the exit-ranking AUC.

    nice -n 10 python benchmarks/defense_live.py --run-dir /tmp/def/audit2 --out benchmarks/results/defense_live.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.attacks.oracle import OracleStealer
from mexit.attacks.signals import Signals
from mexit.audit.defense_eval import exit_ranking_auc
from mexit.data import load_dataset
from mexit.defense import build_guarded, load_key, parse_defense
from mexit.runtime import EarlyExitRuntime


def _one(run_dir: Path, pattern: str) -> Path:
    found = sorted(run_dir.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} under {run_dir}")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/defense_live.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = json.loads((args.run_dir / "audit.json").read_text())["config"]
    target = Signals.load(_one(args.run_dir, "collect-target-*/signals.npz"))
    ds = load_dataset(cfg["dataset"]["name"], cfg["dataset"].get("data_root"))
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(target.sample_index), min(args.samples, len(target.sample_index)), replace=False))
    x = ds.inputs(target.sample_index[pick]).astype(np.float32)
    runtime = EarlyExitRuntime(_one(args.run_dir, "export-target-*/bundle"))
    exits = np.asarray(runtime.predict(x).exit_index, dtype=np.int64)
    key = load_key(args.run_dir / "timeguard.key")
    configs = {"padding": parse_defense("padding"),
               "optimal(epsilon=0.02)": parse_defense("optimal", {"epsilon": 0.02}),
               "timeguard(sigma_ms=5)": parse_defense("timeguard", {"sigma_ms": 5})}
    guarded = {name: build_guarded(runtime, c, key=key, kind=ds.kind, calibration_inputs=x)
               for name, c in configs.items()}

    def undefended(row: np.ndarray) -> int:
        start = time.perf_counter_ns()
        runtime.predict(row)
        return time.perf_counter_ns() - start

    callers: dict[str, Any] = {"none": undefended}
    callers.update({name: (lambda row, g=g: int(g.predict(row).latency_ns[0])) for name, g in guarded.items()})
    lat = {name: np.zeros((len(x), args.repeats)) for name in callers}
    for r in range(args.repeats):  # interleaved: each round runs every defense over a fresh order
        for name, call in callers.items():
            for i in rng.permutation(len(x)):
                lat[name][i, r] = call(x[i : i + 1]) / 1e6
    base = lat["none"]
    results: dict[str, Any] = {}
    oracle = OracleStealer(seed=args.seed)
    for name, m in lat.items():
        results[name] = {
            "mean_added_ms": float(m.mean() - base.mean()), "p99_added_ms": float(np.percentile(m, 99)
                                                                                   - np.percentile(base, 99)),
            "mean_latency_ms": float(m.mean()),
            "oracle_balanced_accuracy": oracle.balanced_accuracy(m / 1e3, exits),
            "exit_ranking_auc": exit_ranking_auc(m.min(axis=1), exits),
        }
        if name in guarded:
            g = guarded[name]
            results[name]["overrun_share"] = g.overruns / max(g.requests, 1)
            results[name]["policy"] = g.describe()
    out = {"benchmark": "defense_live", "run_dir": str(args.run_dir), "samples": len(x), "repeats": args.repeats,
           "exit_counts": np.bincount(exits, minlength=runtime.num_exits).tolist(),
           "chance_balanced": 1.0 / np.unique(exits).size, "results": results,
           "path": "in-process GuardedRuntime.predict around EarlyExitRuntime (onnxruntime, default threads), no HTTP",
           "note": "machine shared with other jobs", "provenance": provenance()}
    atomic_write_json(args.out, out)
    for name, r in results.items():
        print(f"{name:24s} +{r['mean_added_ms']:.3f} / +{r['p99_added_ms']:.3f} ms  oracle "
              f"{r['oracle_balanced_accuracy']:.3f}  ranking {r['exit_ranking_auc']}  "
              f"overruns {r.get('overrun_share')}")
    print(f"chance {out['chance_balanced']:.3f}; exits {out['exit_counts']}; wrote {args.out}")


if __name__ == "__main__":
    main()
