"""Reference-model training on 1 vs 2 local workers (the sweep's process pool): wall time and speed-up.

Trains ``--models`` Location FCN-18-1 reference models (``--epochs`` each, one torch thread per model,
exported to bundles) from an empty directory, once per worker count and ``--rounds`` times in alternating
order (1, 2, 1, 2 …); reports the median wall time per worker count and the ratio. Goal: 2 workers >= 1.7x
faster than 1. The load average before and after is recorded: on a shared machine the ratio is a lower
bound of what an idle 2-core machine gives.

    python benchmarks/lira_rmia_reference_training.py --data-root ../shared/data/location [--models 4]
        [--epochs 5] [--rounds 2] [--out benchmarks/results/lira_rmia_reference_training.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.audit.reference import train_references
from mexit.data import load_dataset, make_splits

GOAL = 1.7
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data/location")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "lira_rmia_reference_training.json")
    args = ap.parse_args()
    for noisy in ("onnx_ir", "onnxscript", "mexit.export", "mexit.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ds = load_dataset("location", args.data_root)
    sp = make_splits(ds.y, seed=0)
    pool = np.concatenate([sp.target_train, sp.target_test])
    recipe = {"epochs": args.epochs, "lr": 1e-3, "batch_size": 128, "optimizer": "adam", "weighting": "sum"}
    load_before = os.getloadavg()
    times: dict[int, list[float]] = {1: [], 2: []}
    for rnd in range(args.rounds):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                train_references(dataset="location", data_root=args.data_root, arch="fcn18-1", exits=6, pool=pool,
                                 n_models=args.models, out_dir=Path(tmp) / "refs", threshold=0.9, recipe=recipe,
                                 seed=rnd, workers=workers, threads=1, exporter="legacy")
                times[workers].append(time.perf_counter() - t0)
            print(f"round {rnd} workers {workers}: {times[workers][-1]:.1f} s")
    med = {w: statistics.median(t) for w, t in times.items()}
    speedup = med[1] / med[2]
    result = {"models": args.models, "epochs": args.epochs, "rounds": args.rounds, "threads_per_model": 1,
              "seconds": {str(w): t for w, t in times.items()}, "median_seconds": {str(w): m for w, m in med.items()},
              "speedup_2_vs_1": speedup, "goal": GOAL, "meets_goal": speedup >= GOAL, "cpu_count": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "command": f"python benchmarks/lira_rmia_reference_training.py --data-root {args.data_root} "
                         f"--models {args.models} --epochs {args.epochs} --rounds {args.rounds}",
              "provenance": provenance()}
    atomic_write_json(args.out, result)
    print(f"speed-up 2 vs 1 workers: {speedup:.2f}x (goal {GOAL}x); wrote {args.out}")


if __name__ == "__main__":
    main()
