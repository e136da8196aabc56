"""Sweep scaling: N independent tiny audits on 1 worker vs 2 workers (local process pool, and Ray when installed).

Every audit is the same tiny in-process audit on digits with a different seed, so the work is
embarrassingly parallel; each audit uses one torch thread, and every configuration starts from an empty
directory (nothing cached). Goal: the 2-worker sweep is >= 1.7x faster than the 1-worker one. Numbers
are only meaningful on an otherwise idle machine with at least 2 cores.

    python benchmarks/sweep_scaling.py [--audits 8] [--epochs 3] [--executors local,ray]
                                       [--out benchmarks/results/sweep_scaling.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

from mexit._io import atomic_write_json, provenance
from mexit.audit.sweep import run_sweep

GOAL = 1.7


def _grid(tmp: Path, audits: int, epochs: int) -> Path:
    grid = tmp / "grid.toml"
    grid.write_text(f"""
set = ["target.epochs={epochs}"]
[base]
threads = 1
dataset = {{ name = "digits" }}
target = {{ arch = "fcn18-1", exits = 3, limit = 60, threshold = 0.5 }}
vanilla = {{ attack = false }}
deployment = {{ mode = "in-process" }}
attacks = {{ names = ["loss", "loss-hybrid", "exit-only"], bootstrap = 20 }}
queries = {{ members = 30, nonmembers = 30, repeats = 2, warmup = 2 }}
timeguard = {{ sigma_grid_ms = [0.1, 1.0] }}
[grid]
seeds = {list(range(audits))}
""")
    return grid


def _time(grid: Path, out: Path, executor: str, workers: int) -> dict:
    start = time.perf_counter()
    result = run_sweep(grid, out, executor=executor, workers=workers, threads=1, progress=False)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    failed = [r["run"] for r in result["runs"] if r.get("status") != "ok"]
    return {"workers": workers, "seconds": seconds, "failed": failed,
            "audit_seconds": [r.get("seconds") for r in result["runs"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audits", type=int, default=8, help="independent audits per sweep (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model (default 3)")
    parser.add_argument("--executors", default="local,ray", help="comma-separated: local, ray (default both)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep_scaling.json")
    args = parser.parse_args()

    report: dict = {"goal_speedup": GOAL, "audits": args.audits, "epochs": args.epochs, "cpu_count": os.cpu_count(),
                    "load_average_before": list(os.getloadavg()), "executors": {}}
    for executor in args.executors.split(","):
        if executor == "ray" and importlib.util.find_spec("ray") is None:
            report["executors"]["ray"] = {"skipped": "Ray is not installed (pip install 'mexit[ray]')"}
            continue
        runs = {}
        for workers in (1, 2):
            with tempfile.TemporaryDirectory(prefix="mexit-sweep-bench-") as tmp:
                grid = _grid(Path(tmp), args.audits, args.epochs)
                runs[str(workers)] = _time(grid, Path(tmp) / "sweep", executor, workers)
            print(f"{executor}, {workers} worker(s): {runs[str(workers)]['seconds']:.1f} s", flush=True)
        speedup = runs["1"]["seconds"] / runs["2"]["seconds"]
        report["executors"][executor] = {**runs, "speedup": speedup, "meets_goal": speedup >= GOAL}
        print(f"{executor}: speed-up with 2 workers {speedup:.2f}x (goal >= {GOAL}x)", flush=True)
    report["load_average_after"] = list(os.getloadavg())
    report["provenance"] = provenance()
    atomic_write_json(args.out, report)
    print(json.dumps({k: v.get("speedup", v) for k, v in report["executors"].items()}))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
