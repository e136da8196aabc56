"""Scoring cost of LiRA and RMIA: R reference models x n samples, every registered variant, on CPU.

The attacks are vectorised over samples x references (numpy/scipy); this measures ``score(target)`` (and
``fit(shadow)`` separately: RMIA offline tunes its ``a`` parameter there) on synthetic signals of the
requested size — the cost does not depend on where the numbers came from. Goal: 64 models x 5,000
samples scored in < 2 s per attack. Each timing is the median of ``--repeats`` runs; the load average
before and after is recorded (the machine may be shared).

    python benchmarks/lira_rmia_scoring.py [--models 64] [--samples 5000] [--exits 6] [--repeats 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from mexit._io import atomic_write_json, provenance
from mexit.attacks.mia import get_attack
from mexit.attacks.reference import half_splits
from mexit.attacks.signals import Signals

GOAL_S = 2.0
NAMES = ("lira-offline", "lira-online", "lira-offline-hybrid", "lira-online-hybrid",
         "rmia-offline", "rmia-online", "rmia-offline-hybrid", "rmia-online-hybrid")
RESULTS = Path(__file__).resolve().parent / "results"


def synthetic(n: int, models: int, exits: int, seed: int) -> Signals:
    """Signals with ``models`` reference columns: per-sample difficulty, membership boost, exits by confidence."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 3, n)
    ref_in = np.stack([np.isin(np.arange(n), h) for h in half_splits(np.arange(n), models, seed)], axis=1)
    ref = base[:, None] + ref_in + rng.normal(0, 0.5, (n, models))
    member = rng.random(n) < 0.5
    phi = base + member + rng.normal(0, 0.5, n)
    p = expit(phi)
    probs = np.stack([1 - p, p], axis=1).astype(np.float32)
    to_exit = lambda v: np.clip((exits - 1) - np.digitize(v, np.linspace(-2, 4, exits - 1)), 0, exits - 1)  # noqa: E731
    return Signals(member=member, true_label=np.ones(n, np.int64), pred_label=(p >= 0.5).astype(np.int64),
                   sample_index=np.arange(n), num_exits=exits, num_classes=2, probs=probs, exit_index=to_exit(phi),
                   reference_score=ref.astype(np.float32), reference_in=ref_in, reference_exit=to_exit(ref))


def median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--exits", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "lira_rmia_scoring.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    shadow = synthetic(args.samples, args.models, args.exits, seed=0)
    target = synthetic(args.samples, args.models, args.exits, seed=1)
    rows = []
    for name in NAMES:
        attack = get_attack(name)
        fit_s = median_time(lambda a=attack: a.fit(shadow), max(1, args.repeats // 2))
        score_s = median_time(lambda a=attack: a.score(target), args.repeats)
        rows.append({"attack": name, "fit_seconds": fit_s, "score_seconds": score_s, "meets_goal": score_s < GOAL_S})
        print(f"{name:22s} fit {fit_s:7.3f} s   score {score_s:7.3f} s")
    result = {"models": args.models, "samples": args.samples, "exits": args.exits, "repeats": args.repeats,
              "goal_seconds": GOAL_S, "timing": "median over repeats of score(target)", "rows": rows,
              "all_meet_goal": all(r["meets_goal"] for r in rows), "cpu_count": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "command": f"python benchmarks/lira_rmia_scoring.py --models {args.models} --samples {args.samples} "
                         f"--exits {args.exits} --repeats {args.repeats}",
              "provenance": provenance()}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
