"""Two versions of ``EarlyExitRuntime.predict``'s batch-1 path on ONE runtime, paired on the same request.

A pairing of two runtime objects is confounded: two sessions of the same graph differ by several µs a request on
this VM, systematically (``--compare two_runtimes`` below), which hid the request fast path's 6–7 µs in session 11's
two-runtime pairing. Here both versions run on the same runtime and
session; before each timed call the configuration is switched (two attribute assignments) and the bundle's full-depth
graph runs once, so both calls meet the caches a deployment's next request meets. Pairs are drawn at random from the
test split (``--exit K``: only samples leaving at exit K), the two versions in random order.

``--compare``:

* ``fast_path``: ``predict``'s request fast path (a ready float32 request goes straight to the single graph) against
  the general path (``_fast_one = None``);
* ``thresholds``: the graph's default thresholds (nothing fed) against feeding one float32 scalar per internal exit;
* ``control``: the same configuration twice — the design's null (its interval should hold 0);
* ``two_runtimes``: the confound itself — two runtime objects of the same bundle and configuration, each in its
  own session, paired the same way.

Reported: the median of the paired differences (first − second, µs) with a percentile bootstrap interval, and the
share of pairs where the first was faster.

    python benchmarks/request_path_paired.py --run RUN_DIR --bundle BUNDLE
        --compare fast_path|thresholds|control|two_runtimes [--threshold T] [--int8-heads] [--exit K] [--pairs 1500]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from request_path_numpy import fed_thresholds  # sibling scripts
from runtime_latency import add_test_split_options, held_out
from scipy import stats

from mexit._io import atomic_write_json, provenance
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import session_options

COMPARISONS = ("fast_path", "thresholds", "control", "two_runtimes")


def versions(rt: EarlyExitRuntime, compare: str,
             make: Callable[[], EarlyExitRuntime]) -> dict[str, tuple[EarlyExitRuntime, Callable[[], None]]]:
    """The two versions of the comparison: each a runtime and the switch that puts it in that version."""
    if compare == "two_runtimes":
        return {"first": (rt, lambda: None), "second": (make(), lambda: None)}
    fast = rt._fast_one
    if fast is None:
        raise SystemExit("this bundle/backend has no request fast path (single graph, max_prob policy, onnx)")
    if rt._taus(None):
        raise SystemExit("this runtime feeds its thresholds anyway (another threshold than the bundle's)")
    fed = fed_thresholds(rt)

    def setter(fast_one: Callable[[np.ndarray], object] | None, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        def apply() -> None:
            rt._fast_one = fast_one  # type: ignore[assignment]
            rt._tau_feeds[None] = feeds
        return apply

    if compare == "fast_path":
        return {"fast_path": (rt, setter(fast, {})), "general_path": (rt, setter(None, {}))}
    if compare == "thresholds":  # both on the fast path, which otherwise holds the feed it was built with
        return {"defaults": (rt, setter(lambda x: rt._one(x, {}), {})),
                "fed": (rt, setter(lambda x: rt._one(x, fed), fed))}
    return {"first": (rt, setter(fast, {})), "second": (rt, setter(fast, {}))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=400, repeats=1)
    parser.add_argument("--compare", choices=COMPARISONS, required=True)
    parser.add_argument("--int8-heads", action="store_true", help="the runtime with int8_heads=True")
    parser.add_argument("--exit", type=int, help="only samples leaving at this exit")
    parser.add_argument("--pairs", type=int, default=1500)
    args = parser.parse_args()
    host = HostRun.begin()
    x, _ = held_out(args)
    def make() -> EarlyExitRuntime:
        return EarlyExitRuntime(args.bundle, threshold=args.threshold,
                                **({"int8_heads": True} if args.int8_heads else {}))

    rt = make()
    switch = versions(rt, args.compare, make)
    names = list(switch)
    if args.exit is not None:
        x = x[rt.predict(x).exit_index == args.exit]
        if not len(x):
            raise SystemExit(f"no test sample leaves at exit {args.exit}")
    same = True
    for i in range(min(len(x), 50)):  # the versions answer alike (and their first calls stay out of the times)
        answers = []
        for name in names:
            runtime, apply = switch[name]
            apply()
            answers.append(runtime.predict(x[i : i + 1]))
        same &= all(np.array_equal(a.probs, answers[0].probs) and np.array_equal(a.exit_index, answers[0].exit_index)
                    for a in answers)
    full = ort.InferenceSession(str(rt.bundle.full_path), session_options(), providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    rng = np.random.default_rng(args.seed)
    diff = np.empty(args.pairs)
    for p in range(args.pairs):
        xi = x[rng.integers(len(x))][None]
        t = {}
        for j in rng.permutation(len(names)):
            runtime, apply = switch[names[j]]
            apply()
            full.run(None, {in_name: xi})  # the caches a deployment's next request meets
            t0 = time.perf_counter_ns()
            runtime.predict(xi)
            t[names[j]] = time.perf_counter_ns() - t0
        diff[p] = (t[names[0]] - t[names[1]]) / 1e3
    ci = stats.bootstrap((diff,), np.median, n_resamples=2000, confidence_level=0.95, method="percentile",
                         random_state=np.random.default_rng(args.seed)).confidence_interval
    m = rt.manifest
    record = {
        "benchmark": "request_path_paired", "compare": args.compare, "versions": names, "run": str(args.run),
        "bundle": str(args.bundle), "arch": m.model.arch, "dataset": m.dataset.name, "threshold": rt.threshold,
        "int8_heads": bool(args.int8_heads), "exit": args.exit, "samples": len(x), "pairs": args.pairs,
        "same_answers": bool(same), "median_difference_us": float(np.median(diff)),
        "median_difference_ci95_us": [float(ci.low), float(ci.high)], "first_faster_share": float(np.mean(diff < 0)),
        **host.fields(),
        "provenance": provenance(seed=args.seed),
    }
    suffix = "" if args.exit is None else f"_exit{args.exit}"
    out = args.out or (Path(__file__).parent / "results"
                       / f"request_path_paired_{args.compare}_{m.dataset.name}_{m.model.arch}{suffix}.json")
    atomic_write_json(out, record)
    print(json.dumps({k: record[k] for k in ("compare", "versions", "exit", "median_difference_us",
                                             "median_difference_ci95_us", "first_faster_share", "same_answers")}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
