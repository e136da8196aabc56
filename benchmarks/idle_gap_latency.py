"""Batch-1 compute time after an idle gap: how much slower an exit runs when the core was idle before the call.

Calibration (``GuardedRuntime``, ``runtime_latency.py``) times each exit back to back, but a served call follows an
idle stretch: the client's think time, the network, a timing defense's own release wait. For each gap in ``--gaps-ms``
this times ``--calls`` calls per exit (``force_exit``), each after ``time.sleep(gap)``, in blocks (one gap and exit at
a time, the first ``--warmup`` calls of a block not counted) whose order is shuffled in every repeat. Reported per
gap and exit: median and p90 in ms, and each median over the back-to-back one (gap 0) from the same run.

    python benchmarks/idle_gap_latency.py --bundle BUNDLE [--gaps-ms 0 1 3 5 10 20] [--exits 0 5] [--out …]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from host_probe import HostRun  # a sibling script

from mexit._io import atomic_write_json, provenance
from mexit.runtime import EarlyExitRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--gaps-ms", type=float, nargs="+", default=[0, 1, 3, 5, 10, 20])
    parser.add_argument("--exits", type=int, nargs="+", help="exits to time (default: the first and the last)")
    parser.add_argument("--calls", type=int, default=40, help="calls per block")
    parser.add_argument("--warmup", type=int, default=5, help="first calls of a block not counted")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    host = HostRun.begin()
    rt = EarlyExitRuntime(args.bundle)
    exits = args.exits or [0, rt.num_exits - 1]
    x = np.random.default_rng(args.seed).random((1, *rt.input_shape)).astype(np.float32)
    rng = np.random.default_rng(args.seed)
    times: dict[tuple[float, int], list[float]] = {(g, k): [] for g in args.gaps_ms for k in exits}
    for _ in range(args.repeats):
        for g, k in rng.permutation([(g, k) for g in args.gaps_ms for k in exits]):
            k = int(k)
            for i in range(args.calls):
                if g:
                    time.sleep(g / 1e3)
                t0 = time.perf_counter_ns()
                rt.predict(x, force_exit=k)
                if i >= args.warmup:
                    times[(float(g), k)].append((time.perf_counter_ns() - t0) / 1e6)
    rows = []
    for k in exits:
        base = statistics.median(times[(float(args.gaps_ms[0]), k)])
        for g in args.gaps_ms:
            v = times[(float(g), k)]
            rows.append({"exit": k, "gap_ms": g, "median_ms": statistics.median(v),
                         "p90_ms": float(np.quantile(v, 0.9)), "median_over_first_gap": statistics.median(v) / base,
                         "calls": len(v)})
    m = rt.manifest
    record = {"benchmark": "idle_gap_latency", "bundle": str(args.bundle), "arch": m.model.arch,
              "dataset": m.dataset.name, "threads": 1, "calls_per_block": args.calls, "warmup": args.warmup,
              "repeats": args.repeats, "rows": rows,
              **host.fields(),
              "provenance": provenance(seed=args.seed)}
    out = args.out or Path(__file__).parent / "results" / f"idle_gap_latency_{m.dataset.name}_{m.model.arch}.json"
    atomic_write_json(out, record)
    for r in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
