"""Batch-1 ``predict`` with and without numpy calls around the single graph's ``run``, paired in one run.

The runtime's batch-1 path on the single early-exit graph takes the label (``ArgMax``) and the input's finiteness
check (``ReduceSum(x * 0)``, NaN for a NaN or infinite input) from the graph itself, so no numpy call runs between
two requests' ``run`` calls. ``numpy_around_run`` restores the previous path on a second runtime of the same bundle:
``np.isfinite(x).all()`` before the run, ``probs.argmax`` and ``np.full`` after it. Both are timed with the flat
full-depth graph in blocks (:func:`runtime_latency.blocked_per_sample`, fresh random order per repeat), and each
is reported as realised / FLOPs-predicted speed-up on the samples' natural exits, with their paired difference per
repeat. The two paths take the same exits and labels (checked).

``thresholds_fed`` (session 11): the graph-only path as it was before the graphs' threshold inputs got the bundle's
threshold as their default — every request feeding one float32 scalar per internal exit besides its input — paired
the same way (``graph_only_minus_thresholds_fed``).

    python benchmarks/request_path_numpy.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--int8-heads] [--out …]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from runtime_latency import (  # a sibling script
    _ratio_of_means,
    add_test_split_options,
    blocked_per_sample,
    held_out,
    over_repeats,
)

from mexit._io import atomic_write_json, provenance
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import session_options


def with_numpy_around_run(rt: EarlyExitRuntime) -> EarlyExitRuntime:
    """``rt`` switched to the previous batch-1 path: numpy's finiteness check before the run, numpy's argmax after."""
    if rt._one is None:
        raise SystemExit("this bundle/backend has no single early-exit graph (policy max_prob, onnx installed)")
    inner = rt._one

    def one(x: np.ndarray, taus: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, exits, _ = inner(x, taus)
        return probs, exits, probs.argmax(axis=1)

    rt._one_checks_finite = False  # validate_inputs runs np.isfinite(x).all() again
    rt._one = one
    rt._fast_one = None  # that path had no request fast path either
    return rt


def fed_thresholds(rt: EarlyExitRuntime) -> dict[str, np.ndarray]:
    """The single graph's threshold inputs, each fed ``rt``'s threshold (what every request sent before the graphs
    defaulted them)."""
    return {f"mexit_tau{j}": np.array(rt.policy.threshold, dtype=np.float32) for j in range(rt.num_exits - 1)}


def with_thresholds_fed(rt: EarlyExitRuntime) -> EarlyExitRuntime:
    """``rt`` feeding every threshold input on every request, as before the graphs defaulted them."""
    feed = fed_thresholds(rt)
    rt._tau_feeds[None] = feed
    if rt._fast_one is not None:
        rt._fast_one = lambda x: rt._one(x, feed)
    return rt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=400, repeats=7)
    parser.add_argument("--int8-heads", action="store_true", help="both runtimes with int8_heads=True")
    args = parser.parse_args()
    host = HostRun.begin()
    x, _ = held_out(args)
    opts = {"int8_heads": True} if args.int8_heads else {}
    graph_only = EarlyExitRuntime(args.bundle, threshold=args.threshold, **opts)
    numpy_around = with_numpy_around_run(EarlyExitRuntime(args.bundle, threshold=args.threshold, **opts))
    fed = with_thresholds_fed(EarlyExitRuntime(args.bundle, threshold=args.threshold, **opts))
    a, b = graph_only.predict(x[:1]), numpy_around.predict(x[:1])
    same = all(
        np.array_equal(p.exit_index, q.exit_index) and np.array_equal(p.labels, q.labels)
        and np.array_equal(p.exit_index, r.exit_index) and np.array_equal(p.probs, r.probs)
        for p, q, r in ((graph_only.predict(x[i : i + 1]), numpy_around.predict(x[i : i + 1]),
                         fed.predict(x[i : i + 1])) for i in range(len(x)))
    ) and a.labels.dtype == b.labels.dtype
    full = ort.InferenceSession(str(graph_only.bundle.full_path), session_options(), providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    exits = graph_only.predict(x).exit_index
    costs = np.asarray(graph_only.exit_costs, dtype=np.float64)[exits]
    full_flops = float(graph_only.manifest.exits[-1].cumulative_flops)
    t = blocked_per_sample({"graph_only": lambda xi: graph_only.predict(xi),
                            "numpy_around_run": lambda xi: numpy_around.predict(xi),
                            "thresholds_fed": lambda xi: fed.predict(xi),
                            "full_graph": lambda xi: full.run(None, {in_name: xi})},
                           x, args.repeats, np.random.default_rng(args.seed))

    def ratio(f: np.ndarray, e: np.ndarray) -> float:
        return _ratio_of_means(f, e, costs, full_flops)

    paths = {name: over_repeats(ratio, t["full_graph"], t[name])
             for name in ("graph_only", "numpy_around_run", "thresholds_fed")}

    def gain(f: np.ndarray, old: np.ndarray, new: np.ndarray) -> float:
        return ratio(f, new) - ratio(f, old)

    diff = over_repeats(gain, t["full_graph"], t["numpy_around_run"], t["graph_only"])
    diff_fed = over_repeats(gain, t["full_graph"], t["thresholds_fed"], t["graph_only"])
    m = graph_only.manifest
    record = {
        "benchmark": "request_path_numpy", "run": str(args.run), "bundle": str(args.bundle), "arch": m.model.arch,
        "dataset": m.dataset.name, "threshold": graph_only.threshold, "int8_heads": bool(args.int8_heads),
        "threads": 1, "samples": len(x), "repeats": args.repeats, "same_exits_and_labels": bool(same),
        "mean_latency_us": {name: float(np.median(v, axis=0).mean()) / 1e3 for name, v in t.items()},
        "realised_over_predicted": paths,
        "graph_only_minus_numpy_around_run": diff,
        "graph_only_minus_thresholds_fed": diff_fed,
        **host.fields(),
        "provenance": provenance(seed=args.seed),
    }
    out = args.out or Path(__file__).parent / "results" / f"request_path_numpy_{m.dataset.name}_{m.model.arch}.json"
    atomic_write_json(out, record)
    print(json.dumps({"mean_latency_us": record["mean_latency_us"],
                      "realised_over_predicted": {k: round(v["value"], 3) for k, v in paths.items()},
                      "difference": round(diff["value"], 4),
                      "difference_per_repeat": [round(d, 4) for d in diff["per_repeat"]],
                      "difference_vs_thresholds_fed": round(diff_fed["value"], 4),
                      "difference_vs_thresholds_fed_per_repeat": [round(d, 4) for d in diff_fed["per_repeat"]],
                      "same_exits_and_labels": same}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
