"""Early-exit runtime latency and throughput on a real bundle and its real test set (ONNX Runtime CPU).

Measures, all in one run so that machine drift affects every side alike:

* per-exit latency at batch 1 (median, p10, p90): ``predict(x, force_exit=k)``, exits interleaved in a
  fresh random order every round;
* chaining overhead per stage: the runtime forced to the last exit (batch 1: the single early-exit graph
  when the backend built one, see ``OrtCpuBackend``; also recorded: the per-stage chain with the decision
  folded into the stage graphs and with the decision in numpy) vs a *fused* graph doing the same work
  (all stages and all heads merged into one ONNX graph with ``onnx.compose``), divided by the number
  of stages; and vs a *bare* ``session.run`` loop over the same stage sessions (no decision, no
  bookkeeping), which splits that overhead into ONNX Runtime's per-session cost (bare - fused) and the
  runtime's own Python work (chain - bare);
* realised early-exit speed-up at batch 1 on the test split: mean latency of the single full-depth
  graph over mean latency of ``predict`` (natural per-sample exits), against the speed-up predicted by
  FLOPs (full-depth FLOPs over the mean runtime FLOPs of the exits actually taken);
* the same realised speed-up against the runtime's *own* full-depth path (``predict(x, full_depth=True)``: the
  same Python wrapper, early exit switched off) — what switching early exit on buys a deployment of this
  runtime, next to what it buys against a bare ``session.run`` of the full graph;
* what the internal heads cost: each internal stage graph timed at batch 1 with and without its head and
  exit decision (the backbone-only graph cut out with ``onnx.utils.Extractor``), next to the heads' share of
  the FLOPs;
* batch-64 and batch-256 throughput with per-sample exits vs the full-depth graph, against the FLOPs
  prediction, and one stage's time per call at 1–256 rows (why dropping rows saves less than their FLOPs);
* the runtime's own Python per batch-1 call, warm and with cold caches (the model call stubbed out);
* the same with the internal heads' large layers in int8 (``int8_heads=True``, :mod:`mexit.runtime.quantize`):
  forced-exit latency next to float32, the realised speed-up and throughput, and the exit and label agreement
  with the float32 runtime on the same samples (and both accuracies when the run's labels are there);
* the realised speed-up and the throughput again with the stages as exported (``skip_conv=False``,
  ``blocked_handoff=False``), i.e. without the rewrites that keep residual stages in ONNX Runtime's blocked layout
  (:mod:`mexit.runtime.layout`);
* the blocked hand-over between stages (``blocked_handoff``, on by default: stage boundaries pass ONNX Runtime's
  blocked tensors without reordering them, :func:`mexit.runtime.layout.hand_over_blocked`) against the same runtime
  without it, float32 and int8 heads: the paired difference in realised/predicted, forced-exit latency and throughput.

Goals: realised/predicted >= 0.9 at batch 1; overhead <= 30 µs per stage; batched gain >= 0.8 x predicted.
The JSON records the load average before and after (timings on a shared machine are only comparable as
ratios within one run).

    python benchmarks/runtime_latency.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--out …]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from onnx import compose

from mexit._io import atomic_write_json, provenance
from mexit.bundle import load_bundle
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import session_options


def fused_graph(bundle_dir: Path, out: Path) -> Path:
    """All stages and heads of a bundle merged into one graph with every exit's logits as outputs."""
    bundle = load_bundle(bundle_dir)
    exits = bundle.manifest.exits
    merged = onnx.load(str(bundle.stage_path(0)))
    logits = [exits[0].logits_output]
    feature = exits[0].feature_output
    for k in range(1, len(exits)):
        e = exits[k]
        stage = compose.add_prefix(onnx.load(str(bundle.stage_path(k))), f"s{k}_")
        keep = [f"s{k}_{e.logits_output}"] + ([f"s{k}_{e.feature_output}"] if e.feature_output else [])
        merged = compose.merge_models(merged, stage, io_map=[(feature, f"s{k}_{e.input_name}")],
                                      outputs=[*logits, *keep])
        logits.append(keep[0])
        feature = keep[1] if len(keep) > 1 else None
    onnx.save(merged, str(out))
    return out


def _percentiles(ns: list[int]) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {"median_us": float(np.median(a)), "p10_us": float(np.percentile(a, 10)),
            "p90_us": float(np.percentile(a, 90))}


def bare_loop(bundle_dir: Path, opts: ort.SessionOptions) -> tuple[list[ort.InferenceSession], list[list[str]],
                                                                     list[str]]:
    """The stage sessions alone, for a ``session.run`` loop without any exit logic (the baseline)."""
    m = load_bundle(bundle_dir).manifest
    sessions = [ort.InferenceSession(str(load_bundle(bundle_dir).stage_path(e.index)), opts,
                                     providers=["CPUExecutionProvider"]) for e in m.exits]
    outputs = [[e.logits_output] if e.feature_output is None else [e.feature_output, e.logits_output] for e in m.exits]
    return sessions, outputs, [e.input_name for e in m.exits]


def per_exit_latency(rt: EarlyExitRuntime, x1: np.ndarray, fused: ort.InferenceSession, full: ort.InferenceSession,
                     bare: tuple[list[ort.InferenceSession], list[list[str]], list[str]], rounds: int,
                     rng: np.random.Generator, variants: dict[str, EarlyExitRuntime] | None = None) -> dict:
    """Batch-1 latency of each forced exit, the fused graph, the full graph and a bare session.run loop, interleaved."""
    k_exits = rt.num_exits
    names = [*(f"exit{k}" for k in range(k_exits)), "fused_all_heads", "full_depth_graph", "bare_session_run_loop"]
    variants = variants or {}  # other runtime configurations, forced to the last exit like exit{K-1}
    names += [f"exit{k_exits - 1}_{v}" for v in variants]
    samples: dict[str, list[int]] = {n: [] for n in names}
    in_name = fused.get_inputs()[0].name
    sessions, outputs, inputs = bare
    for _ in range(rounds):
        for which in rng.permutation(len(names)):
            name = names[which]
            t0 = time.perf_counter_ns()
            if which < k_exits:
                rt.predict(x1, force_exit=int(which))
            elif name == "fused_all_heads":
                fused.run(None, {in_name: x1})
            elif name == "full_depth_graph":
                full.run(None, {in_name: x1})
            elif name.removeprefix(f"exit{k_exits - 1}_") in variants:
                variants[name.removeprefix(f"exit{k_exits - 1}_")].predict(x1, force_exit=k_exits - 1)
            else:
                h = x1
                for sess, outs, inp in zip(sessions, outputs, inputs, strict=True):
                    h = sess.run(outs, {inp: h})[0]
            samples[name].append(time.perf_counter_ns() - t0)
    out = {n: _percentiles(v) for n, v in samples.items()}
    last = out[f"exit{k_exits - 1}"]["median_us"]
    fused_us, bare_us = out["fused_all_heads"]["median_us"], out["bare_session_run_loop"]["median_us"]
    return {
        "latency": out,
        "chaining_overhead_us_per_stage": (last - fused_us) / k_exits,
        "split_us_per_stage": {
            "bare_stage_loop_minus_fused": (bare_us - fused_us) / k_exits,
            "runtime_minus_bare_stage_loop": (last - bare_us) / k_exits,
        },
        "stages": k_exits,
        "goal": "<= 30 us per stage",
    }


def head_cost_split(bundle_dir: Path, x1: np.ndarray, opts: ort.SessionOptions, rounds: int,
                    rng: np.random.Generator) -> dict:
    """Batch-1 latency of each internal stage with and without its head (and folded exit decision).

    The backbone-only graph is the stage cut at its feature output; both run on the real feature map the
    previous stage produced, interleaved in random order. The FLOPs shares come from the manifest:
    ``runtime_flops[k] - cumulative_flops[k]`` is the FLOPs of the heads passed before exit ``k``.
    """
    from onnx.utils import Extractor

    bundle = load_bundle(bundle_dir)
    exits = bundle.manifest.exits
    runtime_flops = [e.runtime_flops for e in exits]
    passed = [e.runtime_flops - e.cumulative_flops for e in exits]  # Σ_{j<k} head_j
    head_flops = [passed[k + 1] - passed[k] for k in range(len(exits) - 1)]
    rows, h = [], x1
    for k, e in enumerate(exits[:-1]):
        model = onnx.load(str(bundle.stage_path(k)))
        backbone = Extractor(model).extract_model([e.input_name], [e.feature_output])
        with_head = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        without = ort.InferenceSession(backbone.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {e.input_name: h}
        for _ in range(20):
            with_head.run(None, feed)
            without.run(None, feed)
        t = {"with_head": [], "backbone_only": []}
        for _ in range(rounds):
            for name in rng.permutation(list(t)):
                sess = with_head if name == "with_head" else without
                t0 = time.perf_counter_ns()
                sess.run(None, feed)
                t[name].append(time.perf_counter_ns() - t0)
        med = {n: float(np.median(v)) / 1e3 for n, v in t.items()}
        rows.append({"stage": k, "with_head_us": med["with_head"], "backbone_only_us": med["backbone_only"],
                     "head_us": med["with_head"] - med["backbone_only"], "head_flops": head_flops[k]})
        h = without.run([e.feature_output], feed)[0]
    head_us = sum(r["head_us"] for r in rows)
    stage_us = sum(r["with_head_us"] for r in rows)
    return {"stages": rows, "internal_heads_us": head_us,
            "internal_heads_latency_share_of_internal_stages": head_us / stage_us if stage_us else None,
            "internal_heads_flops_share_of_full_path": sum(head_flops) / runtime_flops[-1]}


def realised_speedup(rt: EarlyExitRuntime, x: np.ndarray, full: ort.InferenceSession, repeats: int,
                     rng: np.random.Generator) -> dict:
    """Mean batch-1 latency over the test set: full-depth graph vs early exit; FLOPs prediction.

    Two orders, both reported: per sample alternating the two models (``realised_speedup``) and in blocks
    of the whole test set per model (``blocked``, the steady state a deployment of one model sees).
    """
    in_name = full.get_inputs()[0].name
    exits = rt.predict(x).exit_index
    costs = np.asarray(rt.exit_costs, dtype=np.float64)
    full_flops = float(rt.manifest.exits[-1].cumulative_flops)
    predicted = full_flops / costs[exits].mean()
    t_ee, t_full = [], []
    for _ in range(repeats):
        ee_ns, full_ns = 0, 0
        for i in rng.permutation(len(x)):
            xi = x[i : i + 1]
            if rng.random() < 0.5:
                t0 = time.perf_counter_ns()
                rt.predict(xi)
                t1 = time.perf_counter_ns()
                full.run(None, {in_name: xi})
                t2 = time.perf_counter_ns()
                ee_ns, full_ns = ee_ns + t1 - t0, full_ns + t2 - t1
            else:
                t0 = time.perf_counter_ns()
                full.run(None, {in_name: xi})
                t1 = time.perf_counter_ns()
                rt.predict(xi)
                t2 = time.perf_counter_ns()
                ee_ns, full_ns = ee_ns + t2 - t1, full_ns + t1 - t0
        t_ee.append(ee_ns / len(x))
        t_full.append(full_ns / len(x))
    realised = statistics.median(t_full) / statistics.median(t_ee)
    # Blocked: every sample through one model, then every sample through the other (order alternating per
    # repeat). A deployment serves one model in steady state; alternating models per sample (above) lets the
    # second call of each pair run on weights the first left in cache, which favours neither side evenly.
    t = blocked_per_sample({"ee": lambda xi: rt.predict(xi), "full": lambda xi: full.run(None, {in_name: xi}),
                            "rt_full": lambda xi: rt.predict(xi, full_depth=True)}, x, repeats, rng)
    costs_taken = costs[exits]

    def ratio(baseline: np.ndarray, early: np.ndarray) -> float:
        return _ratio_of_means(baseline, early, costs_taken, full_flops)

    bare, same = over_repeats(ratio, t["full"], t["ee"]), over_repeats(ratio, t["rt_full"], t["ee"])
    mean_us = {name: float(np.median(v, axis=0).mean()) / 1e3 for name, v in t.items()}
    return {
        "samples": len(x),
        "blocked": {"mean_latency_early_exit_us": mean_us["ee"],
                    "mean_latency_full_graph_us": mean_us["full"],
                    "mean_latency_runtime_full_depth_us": mean_us["rt_full"],
                    "realised_speedup": bare["value"] * predicted, "realised_over_predicted": bare["value"],
                    "realised_over_predicted_per_repeat": bare["per_repeat"],
                    "realised_speedup_same_wrapper": same["value"] * predicted,
                    "realised_over_predicted_same_wrapper": same["value"],
                    "realised_over_predicted_same_wrapper_per_repeat": same["per_repeat"],
                    "estimator": "each sample's median time over the repeats, means over samples; per_repeat: the "
                                 "same from one repeat's blocks"},
        "exit_shares": (np.bincount(exits, minlength=rt.num_exits) / len(x)).tolist(),
        "mean_latency_early_exit_us": statistics.median(t_ee) / 1e3,
        "mean_latency_full_graph_us": statistics.median(t_full) / 1e3,
        "predicted_speedup_flops": predicted,
        "realised_speedup": realised,
        "realised_over_predicted": realised / predicted,
        "goal": ">= 0.9",
    }


def blocked_per_sample(jobs: dict[str, Any], x: np.ndarray, repeats: int,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each sample's batch-1 time (ns) under each job, shape (repeats, samples); every sample through one job in a
    block (fresh random sample and job order per repeat), the steady state a deployment of one model sees.

    The host's speed drifts between blocks (seconds apart), which moves a block's mean far more than sampling
    does, so spreads are taken over repeats (:func:`over_repeats`), not by resampling samples."""
    for job in jobs.values():  # first calls (allocations, lazy initialisation) stay out of the times
        for i in range(min(20, len(x))):
            job(x[i : i + 1])
    times = {name: np.zeros((repeats, len(x))) for name in jobs}
    names = list(jobs)
    for r in range(repeats):
        order = rng.permutation(len(x))
        for j in rng.permutation(len(names)):
            job, out = jobs[names[j]], times[names[j]][r]
            for i in order:
                t0 = time.perf_counter_ns()
                job(x[i : i + 1])
                out[i] = time.perf_counter_ns() - t0
    return times


def _ratio_of_means(baseline: np.ndarray, early: np.ndarray, costs: np.ndarray, full_flops: float) -> float:
    """Realised speed-up (mean baseline time / mean early-exit time) over the FLOPs-predicted one, same samples."""
    return float((baseline.mean() / early.mean()) / (full_flops / costs.mean()))


def over_repeats(statistic: Any, *arrays: np.ndarray) -> dict[str, Any]:
    """``statistic`` on each sample's median time over the repeats, and on each repeat's blocks alone (its range is
    the run-to-run spread that drift between blocks causes)."""
    per_repeat = [statistic(*(a[r] if a.ndim == 2 else a for a in arrays)) for r in range(arrays[0].shape[0])]
    value = statistic(*(np.median(a, axis=0) if a.ndim == 2 else a for a in arrays))
    return {"value": value, "per_repeat": per_repeat, "range_over_repeats": [min(per_repeat), max(per_repeat)]}


def paired_difference(reference: EarlyExitRuntime, other: EarlyExitRuntime, x: np.ndarray,
                      full: ort.InferenceSession, repeats: int, rng: np.random.Generator) -> dict:
    """Realised/predicted of ``other`` minus ``reference`` (blocked, same samples, all three in each repeat), with the
    difference from each repeat alone; each runtime's FLOPs prediction uses the exits it takes."""
    in_name = full.get_inputs()[0].name
    full_flops = float(reference.manifest.exits[-1].cumulative_flops)
    costs = np.asarray(reference.exit_costs, dtype=np.float64)
    c_ref, c_other = costs[reference.predict(x).exit_index], costs[other.predict(x).exit_index]
    t = blocked_per_sample({"reference": lambda xi: reference.predict(xi), "other": lambda xi: other.predict(xi),
                            "full": lambda xi: full.run(None, {in_name: xi})}, x, repeats, rng)

    def diff(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return _ratio_of_means(f, b, c_other, full_flops) - _ratio_of_means(f, a, c_ref, full_flops)

    d = over_repeats(diff, t["full"], t["reference"], t["other"])
    med = {name: np.median(v, axis=0) for name, v in t.items()}
    return {"realised_over_predicted_reference": _ratio_of_means(med["full"], med["reference"], c_ref, full_flops),
            "realised_over_predicted_other": _ratio_of_means(med["full"], med["other"], c_other, full_flops),
            "difference": d["value"], "difference_per_repeat": d["per_repeat"],
            "difference_range_over_repeats": d["range_over_repeats"], "samples": len(x), "repeats": repeats}

def wrapper_cost(rt: EarlyExitRuntime, x1: np.ndarray, rounds: int) -> dict:
    """The runtime's own Python around one batch-1 graph run, warm and after a cache sweep.

    The graph run is replaced by a stub returning its recorded answer, so only ``predict``'s Python and numpy
    work is timed: back to back (warm caches) and each call after summing a 64 MiB array (cold caches, as after
    a real model run has streamed its weights through them). The difference is what any Python wrapper pays
    per request on top of ``session.run``; it is not in the FLOPs.
    """
    if getattr(rt, "_one", None) is None:
        return {"note": "no single-graph batch-1 path"}
    real = rt._one
    answer = real(x1, rt._taus(None))
    rt._one = lambda xx, taus: answer
    try:
        for _ in range(50):
            rt.predict(x1)
        t0 = time.perf_counter_ns()
        for _ in range(rounds * 10):
            rt.predict(x1)
        warm = (time.perf_counter_ns() - t0) / (rounds * 10) / 1e3
        sweep, cold = np.ones(64 * 1024 * 1024 // 8), []
        for _ in range(rounds):
            sweep.sum()
            t0 = time.perf_counter_ns()
            rt.predict(x1)
            cold.append(time.perf_counter_ns() - t0)
    finally:
        rt._one = real
    return {"warm_us": warm, "cold_us": float(np.median(cold)) / 1e3}


def forced_exit_latency(runtimes: dict[str, EarlyExitRuntime], x1: np.ndarray, rounds: int,
                        rng: np.random.Generator) -> dict:
    """Batch-1 median latency of every forced exit of several runtime configurations, all interleaved."""
    jobs = [(name, k) for name in runtimes for k in range(next(iter(runtimes.values())).num_exits)]
    samples: dict[tuple[str, int], list[int]] = {j: [] for j in jobs}
    for _ in range(rounds):
        for i in rng.permutation(len(jobs)):
            name, k = jobs[i]
            t0 = time.perf_counter_ns()
            runtimes[name].predict(x1, force_exit=k)
            samples[jobs[i]].append(time.perf_counter_ns() - t0)
    return {name: [float(np.median(samples[(name, k)])) / 1e3 for k in range(len(samples) // len(runtimes))]
            for name in runtimes}


def agreement(reference: EarlyExitRuntime, other: EarlyExitRuntime, x: np.ndarray,
              labels: np.ndarray | None) -> dict:
    """How often ``other`` takes the same exit and gives the same label as ``reference`` on ``x`` (per-sample exits)."""
    a, b = reference.predict(x), other.predict(x)
    k = reference.num_exits
    out = {"samples": len(x), "exit_agreement": float(np.mean(a.exit_index == b.exit_index)),
           "label_agreement": float(np.mean(a.labels == b.labels)),
           "max_abs_prob_diff_same_exit": float(np.abs(a.probs - b.probs)[a.exit_index == b.exit_index].max(initial=0)),
           "exit_shares_reference": (np.bincount(a.exit_index, minlength=k) / len(x)).tolist(),
           "exit_shares_other": (np.bincount(b.exit_index, minlength=k) / len(x)).tolist(),
           "exits_moved": [[int(i), int(j), int(c)] for (i, j), c in zip(
               *np.unique(np.stack([a.exit_index, b.exit_index], 1)[a.exit_index != b.exit_index], axis=0,
                          return_counts=True), strict=True)]}
    if labels is not None:
        out["accuracy_reference"] = float(np.mean(a.labels == labels))
        out["accuracy_other"] = float(np.mean(b.labels == labels))
    return out


def stage_cost_by_rows(bare: tuple[list[ort.InferenceSession], list[list[str]], list[str]], x: np.ndarray,
                       rounds: int, rows: tuple[int, ...] = (1, 4, 16, 64, 256)) -> dict:
    """Median time of one middle stage (with its head) per call at several row counts.

    Why the batched gain trails FLOPs: FLOPs scale with the rows still in flight, but a stage whose cost is
    reading its weights (a matrix-vector-like product) costs nearly the same for 10 rows as for 64, so
    dropping rows at an exit saves less than its FLOPs share.
    """
    sessions, outputs, inputs = bare
    k = min(1, len(sessions) - 1)
    h = x[: max(rows)]
    for j in range(k):
        h = sessions[j].run(outputs[j], {inputs[j]: h})[0]
    out = {}
    for r in rows:
        if r > len(h):
            continue
        feed = {inputs[k]: np.ascontiguousarray(h[:r])}
        for _ in range(5):
            sessions[k].run(outputs[k], feed)
        t = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            sessions[k].run(outputs[k], feed)
            t.append(time.perf_counter_ns() - t0)
        med = float(np.median(t)) / 1e3
        out[str(r)] = {"us_per_call": med, "us_per_row": med / r}
    return {"stage": k, "by_rows": out}


def batched_throughput(rt: EarlyExitRuntime, x: np.ndarray, full: ort.InferenceSession, batch: int,
                       repeats: int) -> dict:
    """Samples/s with per-sample exits vs the full-depth graph, batches of ``batch`` over the test set."""
    in_name = full.get_inputs()[0].name
    n = (len(x) // batch) * batch or len(x)
    xs = x[:n]
    exits = rt.predict(xs).exit_index
    costs = np.asarray(rt.exit_costs, dtype=np.float64)
    predicted = float(rt.manifest.exits[-1].cumulative_flops) / costs[exits].mean()
    ee, fu = [], []
    for r in range(repeats):
        for side in (("ee", "full") if r % 2 else ("full", "ee")):
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                if side == "ee":
                    rt.predict(xs[s : s + batch])
                else:
                    full.run(None, {in_name: xs[s : s + batch]})
            (ee if side == "ee" else fu).append(n / (time.perf_counter() - t0))
    gain = statistics.median(ee) / statistics.median(fu)
    return {"batch": batch, "samples": n, "early_exit_samples_per_s": statistics.median(ee),
            "full_graph_samples_per_s": statistics.median(fu), "realised_gain": gain,
            "predicted_gain_flops": predicted, "gain_over_predicted": gain / predicted, "goal": ">= 0.8"}


def add_test_split_options(parser: argparse.ArgumentParser, *, samples: int, repeats: int) -> None:
    """The options of the runtime benchmarks that time a bundle on its run's test split."""
    parser.add_argument("--run", type=Path, required=True, help="training run directory (its test split is used)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle exported from the run (mexit export)")
    parser.add_argument("--threshold", type=float, help="override the bundle's exit threshold")
    parser.add_argument("--samples", type=int, default=samples, help="test samples timed")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)


def write_bundle_record(benchmark: str, args: argparse.Namespace, rt: Any, results: list[dict[str, Any]],
                        host: HostRun) -> Path:
    """Write a bundle benchmark's JSON (the run, bundle, model, threshold, results, machine load and provenance) to
    ``--out`` or ``results/{benchmark}_{dataset}_{arch}.json``; returns the path."""
    m = rt.manifest
    record = {"benchmark": benchmark, "run": str(args.run), "bundle": str(args.bundle), "arch": m.model.arch,
              "dataset": m.dataset.name, "threshold": rt.threshold, "threads": 1, "repeats": args.repeats,
              "batches": results,
              **host.fields(),
              "provenance": provenance(seed=args.seed)}
    out = args.out or Path(__file__).parent / "results" / f"{benchmark}_{m.dataset.name}_{m.model.arch}.json"
    atomic_write_json(out, record)
    return out


def held_out(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The first ``--samples`` inputs of the run's target test split and their labels (torch only to read the run)."""
    from mexit.train.runner import load_run

    run = load_run(args.run)
    idx = run.splits.target_test[: args.samples]
    return run.dataset.inputs(idx), run.dataset.y[idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="training run directory (its test split is used)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle exported from the run (mexit export)")
    parser.add_argument("--threshold", type=float, help="override the bundle's exit threshold (e.g. to mix exits)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=300, help="batch-1 rounds per exit")
    parser.add_argument("--samples", type=int, default=1000, help="test samples for the realised speed-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (all sessions)")
    parser.add_argument("--samples-from", choices=["test", "random"], default="test",
                        help="random: uniform inputs instead of the run's test split (no dataset needed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    host = HostRun.begin()
    tmp = Path(tempfile.mkdtemp(prefix="mexit-bench-"))
    bundle_dir = args.bundle
    rng = np.random.default_rng(args.seed)
    if args.samples_from == "test":
        if args.run is None:
            parser.error("--run is required unless --samples-from random")
        x, labels = held_out(args)
    else:
        labels = None
        shape = load_bundle(bundle_dir).manifest.input.sample_shape
        x = rng.random((args.samples, *shape), dtype=np.float32)
    rt = EarlyExitRuntime(bundle_dir, threshold=args.threshold, threads=args.threads)
    opts = session_options(threads=args.threads)
    full = ort.InferenceSession(str(rt.bundle.full_path), opts, providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(str(fused_graph(bundle_dir, tmp / "fused.onnx")), opts,
                                 providers=["CPUExecutionProvider"])
    rt.warmup(20)
    for _ in range(20):
        full.run(None, {full.get_inputs()[0].name: x[:1]})
        fused.run(None, {fused.get_inputs()[0].name: x[:1]})

    record = {
        "benchmark": "runtime_latency",
        "run": str(args.run) if args.run else None,
        "arch": rt.manifest.model.arch,
        "dataset": rt.manifest.dataset.name,
        "num_exits": rt.num_exits,
        "threshold": rt.threshold,
        "backend": "onnxruntime-cpu",
        "threads": args.threads,
        "flops_fraction_per_exit": [e.cumulative_flops / rt.manifest.exits[-1].cumulative_flops
                                    for e in rt.manifest.exits],
        "backend_options": dict(getattr(rt.backend, "options", {})),
        "batch1": per_exit_latency(rt, x[:1], fused, full, bare_loop(bundle_dir, opts), args.rounds, rng,
                                   variants={
                                       "per_stage_chain_folded_decision": EarlyExitRuntime(
                                           bundle_dir, threshold=args.threshold, threads=args.threads,
                                           single_graph=False),
                                       "per_stage_chain_numpy_decision": EarlyExitRuntime(
                                           bundle_dir, threshold=args.threshold, threads=args.threads,
                                           single_graph=False, fold_decision=False),
                                   }),
        "internal_heads_batch1": head_cost_split(bundle_dir, x[:1], opts, args.rounds, rng),
        "samples_from": args.samples_from,
        "provenance": provenance(seed=args.seed),
    }
    record["realised_speedup_batch1"] = realised_speedup(rt, x, full, args.repeats, rng)
    record["throughput"] = [batched_throughput(rt, x, full, b, args.repeats * 2) for b in (64, 256)]
    # the same measurements without the blocked-layout rewrite of the stages (mexit.runtime.layout), same run
    plain = EarlyExitRuntime(bundle_dir, threshold=args.threshold, threads=args.threads, skip_conv=False,
                             blocked_handoff=False)
    plain.warmup(5)
    record["without_skip_conv"] = {
        "realised_speedup_batch1": realised_speedup(plain, x, full, args.repeats, rng),
        "throughput": [batched_throughput(plain, x, full, b, args.repeats * 2) for b in (64, 256)]}
    # the internal heads' large layers in int8 (mexit.runtime.quantize, OrtCpuBackend(int8_heads=True)), same run
    int8 = EarlyExitRuntime(bundle_dir, threshold=args.threshold, threads=args.threads, int8_heads=True)
    int8.warmup(5)
    record["int8_heads"] = {
        "agreement_with_float32": agreement(rt, int8, x, labels),
        "realised_over_predicted_vs_float32": paired_difference(rt, int8, x, full, args.repeats, rng),
        "forced_exit_latency_us": forced_exit_latency({"float32": rt, "int8_heads": int8}, x[:1], args.rounds, rng),
        "realised_speedup_batch1": realised_speedup(int8, x, full, args.repeats, rng),
        "throughput": [batched_throughput(int8, x, full, b, args.repeats * 2) for b in (64, 256)]}
    # stage boundaries handed over in the blocked layout (the default) vs reordered to NCHW and back, same run
    handoff: dict[str, Any] = {"boundaries_handed_over_blocked": rt.backend.options.get("blocked_handoff")}
    for label, with_handoff in (("float32", rt), ("int8_heads", int8)):
        without = EarlyExitRuntime(bundle_dir, threshold=args.threshold, threads=args.threads,
                                   int8_heads=label == "int8_heads", blocked_handoff=False)
        without.warmup(5)
        handoff[label] = {
            "agreement": agreement(without, with_handoff, x, labels),
            "realised_over_predicted_vs_without": paired_difference(without, with_handoff, x, full, args.repeats, rng),
            "forced_exit_latency_us": forced_exit_latency({"without": without, "blocked_handoff": with_handoff},
                                                          x[:1], args.rounds, rng)}
        if label == "float32":
            handoff[label]["throughput_without"] = [batched_throughput(without, x, full, b, args.repeats * 2)
                                                    for b in (64, 256)]
    record["blocked_handoff"] = handoff
    record["runtime_wrapper_batch1"] = wrapper_cost(rt, x[:1], rounds=args.rounds)
    record["stage_cost_by_rows"] = stage_cost_by_rows(bare_loop(bundle_dir, opts), x, rounds=max(20, args.rounds // 5))
    record.update(host.fields())
    name = f"runtime_latency_{record['dataset']}_{record['arch']}_x{record['num_exits']}.json"
    out = args.out or Path(__file__).parent / "results" / name
    atomic_write_json(out, record)
    print(json.dumps({k: record[k] for k in ("arch", "dataset", "batch1", "internal_heads_batch1",
                                             "realised_speedup_batch1", "throughput", "int8_heads",
                                             "blocked_handoff")},
                     indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
