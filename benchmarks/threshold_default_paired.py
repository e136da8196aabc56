"""Batch-1 ``predict`` with the single graph's default thresholds against feeding them, paired on the same request.

The single graph's ``mexit_tau{k}`` inputs default to the bundle's threshold (initializers of the same name), so a
runtime at that threshold feeds a request's input alone. The other runtime of the same bundle feeds one float32
scalar per internal exit on every request, as before the defaults. For each pair a test sample is drawn; before
each of the two timed ``predict`` calls (in random order) the bundle's full-depth graph runs once, so both calls meet
the caches a deployment's next request meets. Reported: the median of the paired differences (default − fed, µs)
with a percentile bootstrap interval, and the share of pairs where the default was faster. ``--exit K`` keeps only
samples that leave at exit K (less variance between pairs); default: natural exits.

    python benchmarks/threshold_default_paired.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--int8-heads]
        [--exit K] [--pairs 1500] [--out …]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runtime_latency import add_test_split_options, held_out  # a sibling script
from scipy import stats

from mexit._io import atomic_write_json, provenance
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import session_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=400, repeats=1)
    parser.add_argument("--int8-heads", action="store_true", help="both runtimes with int8_heads=True")
    parser.add_argument("--exit", type=int, help="only samples leaving at this exit")
    parser.add_argument("--pairs", type=int, default=1500)
    args = parser.parse_args()
    load_before = os.getloadavg()
    x, _ = held_out(args)
    opts = {"int8_heads": True} if args.int8_heads else {}
    default = EarlyExitRuntime(args.bundle, threshold=args.threshold, **opts)
    fed = EarlyExitRuntime(args.bundle, threshold=args.threshold, **opts)
    if default._taus(None):
        raise SystemExit("this runtime feeds its thresholds anyway (no single graph, or another threshold)")
    fed._tau_feeds[None] = {f"mexit_tau{j}": np.array(fed.policy.threshold, dtype=np.float32)
                            for j in range(fed.num_exits - 1)}
    if args.exit is not None:
        x = x[default.predict(x).exit_index == args.exit]
        if not len(x):
            raise SystemExit(f"no test sample leaves at exit {args.exit}")
    full = ort.InferenceSession(str(default.bundle.full_path), session_options(), providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    rng = np.random.default_rng(args.seed)
    runtimes = {"default": default, "fed": fed}
    diff = np.empty(args.pairs)
    for p in range(args.pairs):
        xi = x[rng.integers(len(x))][None]
        t = {}
        for name in rng.permutation(list(runtimes)):
            full.run(None, {in_name: xi})  # the caches a deployment's next request meets
            t0 = time.perf_counter_ns()
            runtimes[name].predict(xi)
            t[name] = time.perf_counter_ns() - t0
        diff[p] = (t["default"] - t["fed"]) / 1e3
    ci = stats.bootstrap((diff,), np.median, n_resamples=2000, confidence_level=0.95, method="percentile",
                         random_state=np.random.default_rng(args.seed)).confidence_interval
    m = default.manifest
    record = {
        "benchmark": "threshold_default_paired", "run": str(args.run), "bundle": str(args.bundle),
        "arch": m.model.arch, "dataset": m.dataset.name, "threshold": default.threshold,
        "int8_heads": bool(args.int8_heads), "exit": args.exit, "samples": len(x), "pairs": args.pairs,
        "median_difference_us": float(np.median(diff)), "median_difference_ci95_us": [float(ci.low), float(ci.high)],
        "default_faster_share": float(np.mean(diff < 0)),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count()},
        "provenance": provenance(seed=args.seed),
    }
    suffix = "" if args.exit is None else f"_exit{args.exit}"
    out = args.out or (Path(__file__).parent / "results"
                       / f"threshold_default_paired_{m.dataset.name}_{m.model.arch}{suffix}.json")
    atomic_write_json(out, record)
    print(json.dumps({k: record[k] for k in ("median_difference_us", "median_difference_ci95_us",
                                             "default_faster_share", "samples", "pairs")}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
