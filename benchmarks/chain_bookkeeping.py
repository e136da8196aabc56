"""Batched per-stage chain: bookkeeping after the last stage against bookkeeping between stages, paired in one run.

The runtime's chain (:meth:`mexit.runtime.chained.EarlyExitRuntime._chain`) runs only the decision and the
compaction between two stage runs and writes every leaving sample's probabilities, exit and latency after the last
stage. ``between_stages`` restores the previous loop on a second runtime of the same bundle: each stage's leaving
rows written out (``probs[out] = p[done]``, exit index, latency) right after its decision, before the next run.
Why it matters: an operation between two runs pays for the caches the run before it flushed (see ``_chain``).

Also measured, per batch of the runtime's chain (``between_runs_us``): the time outside its stage runs (wall time of
``predict`` minus the time spent inside the backend's stage calls), and the same chain replayed on its recorded stage
outputs, so that nothing evicts the caches between the operations (``replayed_warm_us``): the gap between the two is
what a run costs the Python and numpy work that follows it.

Each repeat passes every batch through both runtimes and the full-depth graph in a fresh random order; reported per
batch size: samples/s (median over repeats), each chain's gain over the full graph divided by the FLOPs-predicted
gain (issue 14's goal: >= 0.8), and the paired difference per repeat with a 95 % bootstrap interval of its
median. Both take the same exits with the same probabilities (checked).

    python benchmarks/chain_bookkeeping.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--repeats 21] [--out …]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from runtime_latency import add_test_split_options, held_out, write_bundle_record  # a sibling script

from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import session_options
from mexit.runtime.policy import softmax


class BetweenStages(EarlyExitRuntime):
    """The runtime with session 8's chain loop: each stage's leaving rows written out before the next stage runs."""

    def _chain(self, x: np.ndarray, offset: int, t0: int, force_exit: int | None, probs: np.ndarray,
               exit_index: np.ndarray, latency: np.ndarray) -> None:
        if not self._scored or force_exit is not None:
            raise SystemExit("the baseline covers the default path only (max_prob policy, decision folded)")
        last = self._num_exits - 1
        active: slice | np.ndarray = slice(offset, offset + len(x))
        h: Any = x
        for k in range(self._num_exits):
            if k == last:
                _, logits = self.backend.run_stage(k, h)
                probs[active] = softmax(logits)
                exit_index[active] = k
                latency[active] = time.perf_counter_ns() - t0
                return
            features, p, conf = self.backend.run_stage_scored(k, h)  # type: ignore[attr-defined]
            done = conf >= self.policy.threshold
            now = time.perf_counter_ns()
            if done.all():
                probs[active], exit_index[active], latency[active] = p, k, now - t0
                return
            if done.any():
                rows = np.arange(active.start, active.stop) if isinstance(active, slice) else active
                out = rows[done]
                probs[out], exit_index[out], latency[out] = p[done], k, now - t0
                keep = np.flatnonzero(~done)
                h = self.backend.take(features, keep)
                active = rows[keep]
            else:
                h = features


def paired_median_ci(diff: list[float], seed: int) -> list[float]:
    """95 % percentile-bootstrap interval of the median of the paired per-repeat differences (scipy)."""
    from scipy.stats import bootstrap

    res = bootstrap((np.asarray(diff),), np.median, n_resamples=5000, method="percentile",
                    random_state=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def between_runs(rt: EarlyExitRuntime, xs: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    """Median µs per batch: the chain's time outside its stage runs, live and replayed on recorded stage outputs."""
    backend = rt.backend
    scored, plain = backend.run_stage_scored, backend.run_stage  # type: ignore[attr-defined]
    inside = [0]

    def timed(f: Any) -> Any:
        def call(k: int, h: Any) -> Any:
            t0 = time.perf_counter_ns()
            out = f(k, h)
            inside[0] += time.perf_counter_ns() - t0
            return out
        return call

    outside, recorded = [], {}
    try:
        backend.run_stage_scored, backend.run_stage = timed(scored), timed(plain)  # type: ignore[attr-defined]
        for _ in range(rounds):
            for s in range(0, len(xs), batch):
                inside[0] = 0
                t0 = time.perf_counter_ns()
                rt.predict(xs[s : s + batch])
                outside.append(time.perf_counter_ns() - t0 - inside[0])
        # record each stage's outputs per (stage, rows), then replay them: the same operations, on warm caches
        backend.run_stage_scored = lambda k, h: recorded.setdefault((k, len(h)), scored(k, h))  # type: ignore
        backend.run_stage = lambda k, h: recorded.setdefault((k, len(h), 0), plain(k, h))  # type: ignore
        for s in range(0, len(xs), batch):
            rt.predict(xs[s : s + batch])
        backend.run_stage_scored = lambda k, h: recorded[(k, len(h))]  # type: ignore[attr-defined]
        backend.run_stage = lambda k, h: recorded[(k, len(h), 0)]  # type: ignore[method-assign]
        warm = []
        for _ in range(rounds):
            for s in range(0, len(xs), batch):
                t0 = time.perf_counter_ns()
                rt.predict(xs[s : s + batch])
                warm.append(time.perf_counter_ns() - t0)
    finally:
        backend.run_stage_scored, backend.run_stage = scored, plain  # type: ignore[attr-defined]
    return {"outside_stage_runs_us": statistics.median(outside) / 1e3,
            "replayed_warm_us": statistics.median(warm) / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=1024, repeats=21)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    host = HostRun.begin()
    x, _ = held_out(args)
    after = EarlyExitRuntime(args.bundle, threshold=args.threshold)
    between = BetweenStages(args.bundle, threshold=args.threshold)
    full = ort.InferenceSession(str(after.bundle.full_path), session_options(), providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    costs = np.asarray(after.exit_costs, dtype=np.float64)
    full_flops = float(after.manifest.exits[-1].cumulative_flops)
    rng = np.random.default_rng(args.seed)
    results = []
    for batch in args.batches:
        n = (len(x) // batch) * batch
        if n == 0:
            continue
        xs = x[:n]
        same = True
        for s in range(0, n, batch):
            a, b = after.predict(xs[s : s + batch]), between.predict(xs[s : s + batch])
            same &= bool(np.array_equal(a.exit_index, b.exit_index) and np.array_equal(a.probs, b.probs))
        exits = after.predict(xs).exit_index
        outside = {"after_last_stage": between_runs(after, xs, batch, 5),
                   "between_stages": between_runs(between, xs, batch, 5)}
        predicted = full_flops / costs[exits].mean()
        jobs = {"after_last_stage": after.predict, "between_stages": between.predict,
                "full_graph": lambda xb: full.run(None, {in_name: xb})}
        seconds: dict[str, list[float]] = {name: [] for name in jobs}
        for job in jobs.values():  # warm-up
            job(xs[:batch])
        for _ in range(args.repeats):
            for name in rng.permutation(list(jobs)):
                t0 = time.perf_counter()
                for s in range(0, n, batch):
                    jobs[name](xs[s : s + batch])
                seconds[name].append(time.perf_counter() - t0)
        ratio = {name: [f / t / predicted for f, t in zip(seconds["full_graph"], seconds[name], strict=True)]
                 for name in ("after_last_stage", "between_stages")}
        diff = [a - b for a, b in zip(ratio["after_last_stage"], ratio["between_stages"], strict=True)]
        results.append({
            "batch": batch, "samples": n, "predicted_gain_flops": predicted,
            "samples_per_s": {name: n / statistics.median(v) for name, v in seconds.items()},
            "gain_over_predicted": {name: statistics.median(v) for name, v in ratio.items()},
            "gain_over_predicted_per_repeat": ratio,
            "after_minus_between_per_repeat": diff,
            "after_minus_between_median": statistics.median(diff),
            "after_minus_between_median_ci95": paired_median_ci(diff, args.seed),
            "repeats_after_ahead": sum(d > 0 for d in diff),
            "between_runs_us": outside, "same_exits_and_probs": same, "goal": ">= 0.8"})
    out = write_bundle_record("chain_bookkeeping", args, after, results, host)
    for r in results:
        print(json.dumps({"batch": r["batch"], "gain_over_predicted": r["gain_over_predicted"],
                          "after_minus_between_median": round(r["after_minus_between_median"], 3),
                          "ci95": [round(v, 3) for v in r["after_minus_between_median_ci95"]],
                          "repeats_after_ahead": f"{r['repeats_after_ahead']}/{args.repeats}",
                          "between_runs_us": {k: {m: round(u) for m, u in v.items()}
                                              for k, v in r["between_runs_us"].items()},
                          "same_exits_and_probs": r["same_exits_and_probs"]}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
