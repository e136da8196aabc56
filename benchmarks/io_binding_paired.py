"""ONNX Runtime's IOBinding for the CPU chain (``io_binding=True``) against plain ``run``, paired in one run.

Issue 14 listed "IOBinding with preallocated, reused output buffers; ``OrtValue`` hand-off between stages" among the
candidates to measure side by side. Three runtimes of one bundle: ``default`` (the single early-exit graph at batch
1, the per-stage chain with the folded decision for batches), ``chain`` (``single_graph=False``: the per-stage chain
at batch 1 too, features handed over as the numpy arrays ``run`` returns) and ``io_binding`` (the per-stage chain,
features kept as ``OrtValue``s and bound with ``bind_ortvalue_input``; the decision in numpy, as that option has it).

Batch 1: each sample's time in blocks (:func:`runtime_latency.blocked_per_sample`, the flat full-depth graph in the
same repeats), realised / FLOPs-predicted at the natural exits, and each runtime minus ``io_binding`` per repeat.
Batches of 64 and 256: samples/s over the test set, the runtimes and the full graph in a fresh random order each
repeat, gain over the FLOPs-predicted gain, and each minus ``io_binding`` per repeat. Same exits checked.

    python benchmarks/io_binding_paired.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--repeats 7] [--out …]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
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

BATCHES = (64, 256)


def batch_rates(runtimes: dict[str, EarlyExitRuntime], full: ort.InferenceSession, x: np.ndarray, batch: int,
                repeats: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Samples/s of each runtime and of the full graph over ``x`` in batches of ``batch``: (repeats,) per job."""
    in_name = full.get_inputs()[0].name
    n = (len(x) // batch) * batch
    xs = x[:n]
    jobs = {**{name: rt.predict for name, rt in runtimes.items()},
            "full_graph": lambda b: full.run(None, {in_name: b})}
    for job in jobs.values():
        job(xs[:batch])
    rates = {name: np.zeros(repeats) for name in jobs}
    names = list(jobs)
    for r in range(repeats):
        for j in rng.permutation(len(names)):
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                jobs[names[j]](xs[s : s + batch])
            rates[names[j]][r] = n / (time.perf_counter() - t0)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=512, repeats=7)
    args = parser.parse_args()
    load_before = os.getloadavg()
    x, _ = held_out(args)
    runtimes = {"default": EarlyExitRuntime(args.bundle, threshold=args.threshold),
                "chain": EarlyExitRuntime(args.bundle, threshold=args.threshold, single_graph=False),
                "io_binding": EarlyExitRuntime(args.bundle, threshold=args.threshold, io_binding=True)}
    ref = runtimes["default"]
    exits = ref.predict(x).exit_index
    same = all(np.array_equal(rt.predict(x).exit_index, exits) for rt in runtimes.values()) and all(
        rt.predict(x[i : i + 1]).exit_index[0] == exits[i] for rt in runtimes.values() for i in range(len(x)))
    full = ort.InferenceSession(str(ref.bundle.full_path), session_options(), providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    rng = np.random.default_rng(args.seed)
    costs = np.asarray(ref.exit_costs, dtype=np.float64)
    full_flops = float(ref.manifest.exits[-1].cumulative_flops)

    jobs = {name: rt.predict for name, rt in runtimes.items()}
    t = blocked_per_sample({**jobs, "full_graph": lambda xi: full.run(None, {in_name: xi})}, x, args.repeats, rng)

    def ratio(f: np.ndarray, e: np.ndarray) -> float:
        return _ratio_of_means(f, e, costs[exits], full_flops)

    def gain(f: np.ndarray, base: np.ndarray, new: np.ndarray) -> float:
        return ratio(f, new) - ratio(f, base)

    batch1 = {"realised_over_predicted": {name: over_repeats(ratio, t["full_graph"], t[name]) for name in runtimes},
              "minus_io_binding": {name: over_repeats(gain, t["full_graph"], t["io_binding"], t[name])
                                   for name in ("default", "chain")},
              "mean_latency_us": {name: float(np.median(v, axis=0).mean()) / 1e3 for name, v in t.items()}}
    batches = []
    for batch in BATCHES:
        n = (len(x) // batch) * batch
        predicted = full_flops / costs[exits[:n]].mean()
        rates = batch_rates(runtimes, full, x, batch, args.repeats, rng)
        over = {name: rates[name] / rates["full_graph"] / predicted for name in runtimes}
        batches.append({
            "batch": batch, "samples": n, "predicted_gain_flops": float(predicted),
            "gain_over_predicted": {name: float(np.median(v)) for name, v in over.items()},
            "gain_over_predicted_per_repeat": {name: v.tolist() for name, v in over.items()},
            "minus_io_binding_per_repeat": {name: (over[name] - over["io_binding"]).tolist()
                                            for name in ("default", "chain")},
        })
    m = ref.manifest
    record = {"benchmark": "io_binding_paired", "run": str(args.run), "bundle": str(args.bundle), "arch": m.model.arch,
              "dataset": m.dataset.name, "threshold": ref.threshold, "threads": 1, "samples": len(x),
              "repeats": args.repeats, "same_exits": bool(same), "batch1": batch1, "batches": batches,
              "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg()),
                                      "cpus": os.cpu_count()},
              "provenance": provenance(seed=args.seed)}
    out = args.out or Path(__file__).parent / "results" / f"io_binding_paired_{m.dataset.name}_{m.model.arch}.json"
    atomic_write_json(out, record)
    print(json.dumps({
        "batch1": {name: round(v["value"], 3) for name, v in batch1["realised_over_predicted"].items()},
        "batch1_minus_io_binding": {name: [round(v["value"], 3), [round(r, 3) for r in v["range_over_repeats"]]]
                                    for name, v in batch1["minus_io_binding"].items()},
        "batches": {b["batch"]: {name: round(v, 3) for name, v in b["gain_over_predicted"].items()} for b in batches},
        "same_exits": same}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
