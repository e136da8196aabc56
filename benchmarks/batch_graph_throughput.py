"""Batched early exit: the per-stage chain against the whole batch as one graph (``batch_graph=True``), same run.

On the run's test samples, in batches of 64 and 256, each repeat passes every batch through the default runtime
(per-stage chain: one ``session.run`` per stage, decisions and compaction in numpy), through the runtime with
``batch_graph=True`` (:mod:`mexit.runtime.batch_graph`: one ``run`` per batch) and through the full-depth graph,
in a fresh random order. Reported: samples/s (median over repeats), each one's gain over the full graph divided by
the FLOPs-predicted gain (issue 14's goal: >= 0.8), the paired difference of the two per repeat, and whether both
take the same exits.

Also timed in the same repeats, as the ceiling of a per-stage chain: ``stages_at_seen_rows`` makes the chain's own
stage calls (the runtime's sessions, decision folded in) on exactly the rows that reached each stage — inputs
gathered beforehand from the chain's exits — with nothing between them: no decision, compaction or copies. Its gain
over predicted is what the chain would reach if all of that were free; below the goal, the goal needs faster
kernels at the row counts early exit leaves, not a leaner runtime. ``stages_at_seen_rows_copied`` adds back the one
copy any compaction must make (each compacted input copied into fresh memory before its stage runs): the ceiling of
any runtime that runs these stage graphs on compacted rows.

    python benchmarks/batch_graph_throughput.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from runtime_latency import add_test_split_options, held_out, write_bundle_record  # a sibling script

from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import session_options


def seen_rows(rt: EarlyExitRuntime, xb: np.ndarray, exits: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(k, input)`` for every stage ``k`` the batch ``xb`` reaches: exactly the rows with ``exits >= k``."""
    feeds = []
    h, alive = xb, np.arange(len(xb))
    for k in range(rt.num_exits):
        if len(alive) == 0:
            break
        feeds.append((k, np.ascontiguousarray(h)))
        if k + 1 == rt.num_exits:
            break
        features, _ = rt.backend.run_stage(k, h)
        keep = exits[alive] > k
        h, alive = features[keep], alive[keep]
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=1024, repeats=7)
    args = parser.parse_args()
    load_before = os.getloadavg()
    x, _ = held_out(args)
    chain = EarlyExitRuntime(args.bundle, threshold=args.threshold)
    graph = EarlyExitRuntime(args.bundle, threshold=args.threshold, batch_graph=True)
    full = ort.InferenceSession(str(chain.bundle.full_path), session_options(), providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    costs = np.asarray(chain.exit_costs, dtype=np.float64)
    full_flops = float(chain.manifest.exits[-1].cumulative_flops)
    backend, last = chain.backend, chain.num_exits - 1
    rng = np.random.default_rng(args.seed)
    results = []
    for batch in (64, 256):
        n = (len(x) // batch) * batch
        if n == 0:  # fewer samples than one batch
            continue
        xs = x[:n]
        exits = chain.predict(xs).exit_index
        same_exits = bool(np.array_equal(graph.predict(xs).exit_index, exits))
        predicted = full_flops / costs[exits].mean()
        feeds = {s: seen_rows(chain, xs[s : s + batch], exits[s : s + batch]) for s in range(0, n, batch)}

        def stages_only(xb: np.ndarray, s: int, feeds: dict = feeds, copy: bool = False) -> None:
            for k, h in feeds[s]:  # the chain's own stage calls (decision folded in), nothing between them
                h = h.copy() if copy and k else h  # the one copy any compaction makes, into fresh memory
                backend.run_stage(k, h) if k == last else backend.run_stage_scored(k, h)

        jobs = {"per_stage_chain": lambda xb, s: chain.predict(xb), "batch_graph": lambda xb, s: graph.predict(xb),
                "stages_at_seen_rows": stages_only,
                "stages_at_seen_rows_copied": lambda xb, s: stages_only(xb, s, copy=True),
                "full_graph": lambda xb, s: full.run(None, {in_name: xb})}
        rates: dict[str, list[float]] = {name: [] for name in jobs}
        for job in jobs.values():  # warm-up
            job(xs[:batch], 0)
        for _ in range(args.repeats):
            for name in rng.permutation(list(jobs)):
                t0 = time.perf_counter()
                for s in range(0, n, batch):
                    jobs[name](xs[s : s + batch], s)
                rates[name].append(n / (time.perf_counter() - t0))
        ratio = {name: [r / f / predicted for r, f in zip(rates[name], rates["full_graph"], strict=True)]
                 for name in ("per_stage_chain", "batch_graph", "stages_at_seen_rows", "stages_at_seen_rows_copied")}
        med = {name: statistics.median(v) for name, v in rates.items()}
        results.append({
            "batch": batch, "samples": n, "predicted_gain_flops": predicted, "samples_per_s": med,
            "gain_over_predicted": {name: med[name] / med["full_graph"] / predicted
                                    for name in ("per_stage_chain", "batch_graph", "stages_at_seen_rows",
                                                 "stages_at_seen_rows_copied")},
            "gain_over_predicted_per_repeat": ratio,
            "batch_graph_minus_chain_per_repeat": [b - a for a, b in zip(ratio["per_stage_chain"],
                                                                         ratio["batch_graph"], strict=True)],
            "same_exits": same_exits, "goal": ">= 0.8"})
    out = write_bundle_record("batch_graph_throughput", args, chain, results, load_before)
    for r in results:
        print(json.dumps({"batch": r["batch"], "gain_over_predicted": r["gain_over_predicted"],
                          "difference_per_repeat": [round(d, 3) for d in r["batch_graph_minus_chain_per_repeat"]],
                          "same_exits": r["same_exits"]}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
