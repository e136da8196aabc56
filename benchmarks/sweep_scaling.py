"""Sweep scaling: N independent tiny audits on 1 worker vs 2 workers, on the local process pool and on Ray.

Every audit is the same tiny in-process audit on digits with a different seed, so the work is
embarrassingly parallel; each audit uses one torch thread (and each Ray task reserves one CPU), and every
configuration starts from an empty directory (nothing cached). For Ray, each sweep starts its own local
instance (``workers`` CPUs) and shuts it down, and that start-up is part of the measured time. Goal: the
2-worker sweep is >= 1.7x faster than the 1-worker one. Numbers are only meaningful on an otherwise idle
machine with at least 2 cores (the load average before and after is recorded).

    python benchmarks/sweep_scaling.py [--executor local,ray] [--workers 1,2] [--audits 8] [--epochs 3]
                                       [--out PATH] [--dry]

``--dry`` validates the grid and the executors (Ray importable) and prints the plan without running
anything. The default output is ``benchmarks/results/sweep_scaling.json`` for both executors, else
``sweep_scaling-<executor>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from mexit._io import atomic_write_json, provenance
from mexit.audit.sweep import plan_sweep, run_sweep

GOAL = 1.7
EXECUTORS = ("local", "ray")
RESULTS = Path(__file__).resolve().parent / "results"


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


def _time(grid: Path, out: Path, executor: str, workers: int) -> dict[str, Any]:
    start = time.perf_counter()
    result = run_sweep(grid, out, executor=executor, workers=workers, threads=1, progress=False)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    failed = {r["run"]: r.get("error") for r in result["runs"] if r.get("status") != "ok"}
    return {"workers": workers, "seconds": seconds, "failed": failed,
            "audit_seconds": [r.get("seconds") for r in result["runs"]]}


def _csv(text: str, kind: type = str) -> list[Any]:
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", "--executors", dest="executors", default="local,ray",
                        help="comma-separated: local, ray (default both)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated (default 1,2); "
                                                         "the speed-up is the first over the last")
    parser.add_argument("--audits", type=int, default=8, help="independent audits per sweep (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: benchmarks/results/...)")
    parser.add_argument("--dry", action="store_true", help="validate and print the plan; run nothing")
    args = parser.parse_args()
    executors = _csv(args.executors)
    workers = _csv(args.workers, int)
    if bad := [e for e in executors if e not in EXECUTORS]:
        parser.error(f"unknown executor(s) {bad}; choose from {list(EXECUTORS)}")
    if len(workers) < 2 or min(workers) < 1:
        parser.error("--workers needs at least two counts >= 1, e.g. 1,2")
    out = args.out or RESULTS / ("sweep_scaling.json" if set(executors) == set(EXECUTORS)
                                 else f"sweep_scaling-{'-'.join(executors)}.json")

    with tempfile.TemporaryDirectory(prefix="mexit-sweep-bench-") as tmp:
        plan = plan_sweep(_grid(Path(tmp), args.audits, args.epochs))
    has_ray = importlib.util.find_spec("ray") is not None
    print(f"{len(plan)} audits ({plan[0][0]} ...) x workers {workers} x executors {executors}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; result -> {out}", flush=True)
    if "ray" in executors and not has_ray:
        print("ray: not installed (pip install 'mexit[ray]'); it will be recorded as skipped", flush=True)
    if args.dry:
        return

    report: dict[str, Any] = {"goal_speedup": GOAL, "audits": args.audits, "epochs": args.epochs,
                              "workers": workers, "cpu_count": os.cpu_count(),
                              "load_average_before": list(os.getloadavg()), "executors": {}}
    for executor in executors:
        if executor == "ray" and not has_ray:
            report["executors"]["ray"] = {"skipped": "Ray is not installed (pip install 'mexit[ray]')"}
            continue
        runs = {}
        for n in workers:
            with tempfile.TemporaryDirectory(prefix="mexit-sweep-bench-") as tmp:
                grid = _grid(Path(tmp), args.audits, args.epochs)
                runs[str(n)] = _time(grid, Path(tmp) / "sweep", executor, n)
            print(f"{executor}, {n} worker(s): {runs[str(n)]['seconds']:.1f} s"
                  + (f", FAILED {runs[str(n)]['failed']}" if runs[str(n)]["failed"] else ""), flush=True)
        speedup = runs[str(workers[0])]["seconds"] / runs[str(workers[-1])]["seconds"]
        entry: dict[str, Any] = {**runs, "speedup": speedup, "meets_goal": speedup >= GOAL}
        if executor == "ray":
            import ray

            entry["ray_version"] = ray.__version__
        report["executors"][executor] = entry
        print(f"{executor}: speed-up {workers[-1]} vs {workers[0]} workers {speedup:.2f}x (goal >= {GOAL}x)",
              flush=True)
    report["load_average_after"] = list(os.getloadavg())
    report["provenance"] = provenance()
    atomic_write_json(out, report)
    print(json.dumps({k: v.get("speedup", v) for k, v in report["executors"].items()}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
