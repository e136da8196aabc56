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

Two more ways to run a batch's early exit, issue 14's last candidates, timed in the same repeats with the chain's own
stage calls (decision folded in) and checked to take the chain's exits:

- ``masked``: no compaction. Every stage runs on all rows of the batch until every row has left; a row's exit is
  the first whose maximum probability reaches τ. No gathers or copies, but rows that left still cost compute.
- ``bucketed_stream``: stage-major over the whole stream of batches. Stage k runs on the rows that reached it from
  every batch, in calls of at most ``batch`` rows (the survivors of earlier batches fill the buckets of later ones),
  so late stages see full buckets instead of the few rows one batch leaves them. It is the throughput an offline
  scorer could get; a request-serving batch cannot wait for other batches' rows, so its per-batch latency is not
  comparable and it is not a drop-in for ``predict``.

    python benchmarks/batch_graph_throughput.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
from chain_bookkeeping import paired_median_ci  # sibling scripts
from host_probe import HostRun
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


#: The ways of running a batch whose gain over the FLOPs-predicted gain the JSON reports (the full graph is the base).
RATIOS = ("per_stage_chain", "batch_graph", "stages_at_seen_rows", "stages_at_seen_rows_copied", "masked",
          "bucketed_stream")


def minus_chain(ratio: dict[str, list[float]], seed: int) -> dict[str, dict[str, Any]]:
    """Each path's gain over predicted minus the chain's, paired per repeat: median, its 95 % bootstrap interval and
    how many repeats the path was ahead."""
    out = {}
    for name in RATIOS[1:]:
        diff = [b - a for a, b in zip(ratio["per_stage_chain"], ratio[name], strict=True)]
        out[name] = {"median": statistics.median(diff), "ci95": paired_median_ci(diff, seed),
                     "ahead": sum(d > 0 for d in diff), "repeats": len(diff)}
    return out


def masked(rt: EarlyExitRuntime, xb: np.ndarray) -> np.ndarray:
    """The batch's exits with no compaction: every stage on all rows until each has met τ once (module docstring)."""
    backend, last, tau = rt.backend, rt.num_exits - 1, rt.policy.threshold
    exits = np.full(len(xb), last, dtype=np.int64)
    open_rows = np.ones(len(xb), dtype=bool)
    h: Any = xb
    for k in range(last):
        h, _, conf = backend.run_stage_scored(k, h)
        leaving = open_rows & (conf >= tau)
        exits[leaving] = k
        open_rows &= ~leaving
        if not open_rows.any():
            return exits
    backend.run_stage(last, h)
    return exits


def bucketed_stream(rt: EarlyExitRuntime, xs: np.ndarray, bucket: int) -> np.ndarray:
    """Every sample's exit, stage-major over the stream ``xs``, calls of at most ``bucket`` rows (module docstring)."""
    backend, last, tau = rt.backend, rt.num_exits - 1, rt.policy.threshold
    exits = np.full(len(xs), last, dtype=np.int64)
    h: Any = xs
    alive = np.arange(len(xs))
    for k in range(last):
        kept = []
        for s in range(0, len(alive), bucket):
            features, _, conf = backend.run_stage_scored(k, h[s : s + bucket])
            done = conf >= tau
            exits[alive[s : s + bucket][done]] = k
            kept.append((features, ~done))
        stay = np.concatenate([m for _, m in kept])
        alive = alive[stay]
        if len(alive) == 0:
            return exits
        h = np.concatenate([f[m] for f, m in kept])  # the one compaction copy, as the chain makes
    for s in range(0, len(alive), bucket):
        backend.run_stage(last, h[s : s + bucket])
    return exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=1024, repeats=7)
    args = parser.parse_args()
    host = HostRun.begin()
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

        def per_batch(job: Callable[[np.ndarray, int], Any], xs: np.ndarray = xs, batch: int = batch) -> Callable:
            return lambda: [job(xs[s : s + batch], s) for s in range(0, len(xs), batch)]

        jobs = {"per_stage_chain": per_batch(lambda xb, s: chain.predict(xb)),
                "batch_graph": per_batch(lambda xb, s: graph.predict(xb)),
                "stages_at_seen_rows": per_batch(stages_only),
                "stages_at_seen_rows_copied": per_batch(lambda xb, s: stages_only(xb, s, copy=True)),
                "masked": per_batch(lambda xb, s: masked(chain, xb)),
                "bucketed_stream": lambda xs=xs, batch=batch: bucketed_stream(chain, xs, batch),
                "full_graph": per_batch(lambda xb, s: full.run(None, {in_name: xb}))}
        other_exits = {"masked": np.concatenate(jobs["masked"]()), "bucketed_stream": jobs["bucketed_stream"]()}
        same_exits_as_chain = {"batch_graph": same_exits,
                               **{k: bool(np.array_equal(v, exits)) for k, v in other_exits.items()}}
        rates: dict[str, list[float]] = {name: [] for name in jobs}
        for job in jobs.values():  # warm-up
            job()
        for _ in range(args.repeats):
            for name in rng.permutation(list(jobs)):
                t0 = time.perf_counter()
                jobs[name]()
                rates[name].append(n / (time.perf_counter() - t0))
        ratio = {name: [r / f / predicted for r, f in zip(rates[name], rates["full_graph"], strict=True)]
                 for name in RATIOS}
        med = {name: statistics.median(v) for name, v in rates.items()}
        results.append({
            "batch": batch, "samples": n, "predicted_gain_flops": predicted, "samples_per_s": med,
            "gain_over_predicted": {name: med[name] / med["full_graph"] / predicted for name in RATIOS},
            "gain_over_predicted_per_repeat": ratio,
            "batch_graph_minus_chain_per_repeat": [b - a for a, b in zip(ratio["per_stage_chain"],
                                                                         ratio["batch_graph"], strict=True)],
            "minus_chain": minus_chain(ratio, args.seed),
            "same_exits": same_exits, "same_exits_as_chain": same_exits_as_chain, "goal": ">= 0.8"})
    out = write_bundle_record("batch_graph_throughput", args, chain, results, host)
    for r in results:
        print(json.dumps({"batch": r["batch"], "gain_over_predicted": r["gain_over_predicted"],
                          "difference_per_repeat": [round(d, 3) for d in r["batch_graph_minus_chain_per_repeat"]],
                          "same_exits_as_chain": r["same_exits_as_chain"]}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
