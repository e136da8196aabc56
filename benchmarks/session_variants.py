"""Runtime variants that need sessions of their own, paired: ONNX Runtime session options and graph rewrites.

``mexit.runtime.backends.session_options`` leaves ONNX Runtime's memory defaults on (memory pattern, CPU arena,
memory reuse, weight prepacking). Issue 14 listed these among the candidates to measure side by side; this runs
the same bundle under each variant, through ``EarlyExitRuntime`` (its default path: the single early-exit graph
at batch 1, the per-stage chain for batches), next to a bare ``session.run`` of the full-depth graph. The session
options (the default ``--variants``):

* ``default``: mexit's options;
* ``no_mem_pattern`` / ``no_cpu_arena`` / ``no_mem_reuse``: ``enable_mem_pattern``, ``enable_cpu_mem_arena``,
  ``enable_mem_reuse`` off;
* ``env_allocators``: ``session.use_env_allocators=1`` with one arena allocator registered in the environment, so
  every session of the runtime (stages, single graph) allocates from one shared arena;
* ``denormal_as_zero``: ``session.set_denormal_as_zero=1`` (flush-to-zero on the session's thread);
* ``no_prepacking``: ``session.disable_prepacking=1`` (weights not repacked for the kernels at load: the control
  expected to lose).

``control`` is ``default`` again on runtimes of its own: the design's null, whose interval should hold 0.
Graph rewrites, as backend options: ``no_fold_pools`` (``fold_pools=False``: the heads' mixed pools as exported,
:mod:`mexit.runtime.pool_fold`) and ``no_blocked_handoff`` (``blocked_handoff=False``: every stage boundary reordered
to NCHW and back, :func:`mexit.runtime.layout.hand_over_blocked`); and ``int8_heads`` against float32 heads (run without
``--int8-heads``; :mod:`mexit.runtime.quantize`).

A session's options are fixed when it is created, so variants cannot be switched on one session as
``request_path_paired.py`` does, and two sessions of one graph differ systematically by several µs a request on
this VM (``request_path_paired.py --compare two_runtimes``). So each variant gets ``--runtimes`` runtime objects
(each with its own sessions), built round-robin across the versions: the first runs built each version's runtimes
one after another, and the last-built version may have been favoured (``docs/results.md``). Each round takes one test
input (or a batch of ``--batch`` distinct ones) and calls every variant once on it, in random order, each on a
random one of its runtimes, with the full-depth graph run just before each call (the caches a deployment's next
request meets; its times are the baseline). Pairing within a round removes the host's drift, which moves blocked
means by ±10 % on a busy VM. A variant's difference from ``default`` is the mean paired difference, with a 95 %
bootstrap interval that resamples rounds and, within each variant, the runtimes (the session luck).

The options are applied by wrapping ``mexit.runtime.backends.session_options`` while each runtime is built (the
backend offers no option for them, since none is in use); the graphs are the runtime's own.

    python benchmarks/session_options.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--int8-heads]
        [--variants default,control,...] [--runtimes 3] [--pairs 1000] [--samples 200] [--batch 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from runtime_latency import add_test_split_options, held_out  # a sibling script

import mexit.runtime.backends as backends
from mexit._io import atomic_write_json, provenance
from mexit.runtime import EarlyExitRuntime

#: Each variant: attributes of ``ort.SessionOptions`` and session config entries set over mexit's options, and
#: backend options of the runtime.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "control": {},
    "no_mem_pattern": {"attrs": {"enable_mem_pattern": False}},
    "no_cpu_arena": {"attrs": {"enable_cpu_mem_arena": False}},
    "no_mem_reuse": {"attrs": {"enable_mem_reuse": False}},
    "env_allocators": {"config": {"session.use_env_allocators": "1"}},
    "denormal_as_zero": {"config": {"session.set_denormal_as_zero": "1"}},
    "no_prepacking": {"config": {"session.disable_prepacking": "1"}},
    "no_fold_pools": {"backend": {"fold_pools": False}},
    "no_blocked_handoff": {"backend": {"blocked_handoff": False}},
    "int8_heads": {"backend": {"int8_heads": True}},
}
#: What ``--variants`` runs unless told otherwise.
SESSION_OPTIONS = ("default", "control", "no_mem_pattern", "no_cpu_arena", "no_mem_reuse", "env_allocators",
                   "denormal_as_zero", "no_prepacking")


def register_env_allocator() -> None:
    """One CPU arena allocator in ONNX Runtime's environment, which ``session.use_env_allocators`` sessions share."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


@contextmanager
def session_options_with(variant: dict[str, Any]) -> Iterator[None]:
    """``mexit.runtime.backends.session_options`` returning mexit's options changed as ``variant`` says."""
    original = backends.session_options

    def changed(**kwargs: Any) -> ort.SessionOptions:
        so = original(**kwargs)
        for name, value in variant.get("attrs", {}).items():
            setattr(so, name, value)
        for key, value in variant.get("config", {}).items():
            so.add_session_config_entry(key, value)
        return so

    backends.session_options = changed  # type: ignore[assignment]
    try:
        yield
    finally:
        backends.session_options = original  # type: ignore[assignment]


def paired_times(calls: dict[str, list[Callable[[np.ndarray], Any]]], full: Callable[[np.ndarray], Any],
                 inputs: Callable[[], np.ndarray], pairs: int,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Per round, one input and every variant once, in random order, each on a random one of its runtimes, with the
    full-depth graph run (and timed) just before each call: ``(times, runtime_used, full_times)``, ns."""
    names = list(calls)
    times = {name: np.zeros(pairs) for name in names}
    used = {name: np.zeros(pairs, dtype=np.int64) for name in names}
    full_ns = np.zeros((pairs, len(names)))
    for p in range(pairs):
        xi = inputs()
        for slot, j in enumerate(rng.permutation(len(names))):
            name = names[j]
            k = int(rng.integers(len(calls[name])))
            t0 = time.perf_counter_ns()
            full(xi)  # the caches a deployment's next request meets; its time is the baseline
            t1 = time.perf_counter_ns()
            calls[name][k](xi)
            t2 = time.perf_counter_ns()
            times[name][p], used[name][p], full_ns[p, slot] = t2 - t1, k, t1 - t0
    return times, used, full_ns.mean(axis=1)


def compare(times: dict[str, np.ndarray], used: dict[str, np.ndarray], runtimes: int, rng: np.random.Generator,
            resamples: int = 2000) -> dict[str, Any]:
    """Per variant: its mean time and its mean paired difference from ``default``, with a 95 % interval from a
    bootstrap that resamples runtimes within each of the two variants (the session luck) and rounds (Poisson
    weights), so a variant's few sessions cannot pass for its options."""
    base = times["default"]
    out: dict[str, Any] = {}

    def draw_runtimes() -> np.ndarray:
        return np.bincount(rng.integers(0, runtimes, runtimes), minlength=runtimes)

    for name, t in times.items():
        diff = t - base
        boots = np.empty(resamples)
        for b in range(resamples):
            w = rng.poisson(1.0, len(t)) * draw_runtimes()[used[name]] * draw_runtimes()[used["default"]]
            boots[b] = (w * diff).sum() / max(w.sum(), 1)
        per_runtime = [float(t[used[name] == k].mean()) if np.any(used[name] == k) else None for k in range(runtimes)]
        out[name] = {"mean": float(t.mean()), "difference_from_default": float(diff.mean()),
                     "difference_ci95": [float(v) for v in np.percentile(boots, [2.5, 97.5])],
                     "runtime_means": per_runtime}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=200, repeats=1)
    parser.add_argument("--pairs", type=int, default=1000, help="rounds at batch 1 (batches: 4 x pairs / batch)")
    parser.add_argument("--int8-heads", action="store_true", help="the runtimes with int8_heads=True")
    parser.add_argument("--runtimes", type=int, default=3, help="runtime objects per variant (session luck)")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the throughput part (0: skip)")
    parser.add_argument("--variants", default=",".join(SESSION_OPTIONS),
                        help=f"comma-separated, default first; of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    names = args.variants.split(",")
    if names[0] != "default" or any(n not in VARIANTS for n in names):
        raise SystemExit(f"--variants: 'default' first, then any of {', '.join(VARIANTS)}")
    host = HostRun.begin()
    x, _ = held_out(args)
    if "env_allocators" in names:
        register_env_allocator()
    options = {"int8_heads": True} if args.int8_heads else {}
    runtimes: dict[str, list[EarlyExitRuntime]] = {name: [] for name in names}
    for _ in range(args.runtimes):  # round-robin, so that no version's sessions are all built first or last
        for name in names:
            with session_options_with(VARIANTS[name]):
                runtimes[name].append(EarlyExitRuntime(args.bundle, threshold=args.threshold,
                                                       **{**options, **VARIANTS[name].get("backend", {})}))
    reference = runtimes["default"][0]
    answer = reference.predict(x)
    same = {name: float(np.mean([np.mean(rt.predict(x).exit_index == answer.exit_index) for rt in rts]))
            for name, rts in runtimes.items()}  # share of the test samples leaving where default's runtime sends them
    full = ort.InferenceSession(str(reference.bundle.full_path), backends.session_options(),
                                providers=["CPUExecutionProvider"])
    in_name = full.get_inputs()[0].name
    costs = np.asarray(reference.exit_costs, dtype=np.float64)
    full_flops = float(reference.manifest.exits[-1].cumulative_flops)
    rng = np.random.default_rng(args.seed)
    for rts in runtimes.values():  # first calls (allocations, lazy initialisation) stay out of the times
        for rt in rts:
            for i in range(min(20, len(x))):
                rt.predict(x[i : i + 1])

    calls = {name: [rt.predict for rt in rts] for name, rts in runtimes.items()}

    def measured(size: int, rounds: int, ratio: str, predicted_key: str) -> dict[str, Any]:
        """Every version paired over ``rounds`` inputs of ``size`` distinct test samples; ``ratio``: the key of each
        version's realised / FLOPs-predicted speed-up (or gain) against the full-depth graph's time, stored with the
        prediction under ``predicted_key``."""
        picked: list[int] = []

        def draw() -> np.ndarray:
            idx = rng.choice(len(x), size=min(size, len(x)), replace=False)
            picked.extend(idx.tolist())
            return x[idx]

        times, used, full_ns = paired_times(calls, lambda xb: full.run(None, {in_name: xb}), draw, rounds, rng)
        predicted = full_flops / costs[answer.exit_index[picked]].mean()
        rows = compare({n: t / 1e3 for n, t in times.items()}, used, args.runtimes, rng)
        full_us = float(full_ns.mean() / 1e3)
        for row in rows.values():
            row[ratio] = full_us / row["mean"] / predicted
        return {"full_graph_us": full_us, predicted_key: predicted, "variants": rows}

    record: dict[str, Any] = {
        "benchmark": "session_variants", "run": str(args.run), "bundle": str(args.bundle),
        "arch": reference.manifest.model.arch, "dataset": reference.manifest.dataset.name,
        "threshold": reference.threshold, "int8_heads": bool(args.int8_heads),
        "variants": {n: VARIANTS[n] for n in names}, "runtimes_per_variant": args.runtimes,
        "samples": len(x), "rounds": args.pairs, "exit_agreement_with_default": same,
        "batch1": {"unit": "µs a request, mean over rounds; realised / FLOPs-predicted speed-up against the bare "
                           "session.run of the full-depth graph timed just before each call",
                   **measured(1, args.pairs, "realised_over_predicted", "predicted_speedup_flops")},
    }
    if args.batch:
        rounds = max(args.pairs // args.batch * 4, 20)
        record["batched"] = {"batch": args.batch, "rounds": rounds,
                             "unit": "µs a batch, mean over rounds; gain over the full-depth graph (timed just before "
                                     "each call), over the FLOPs-predicted gain",
                             **measured(args.batch, rounds, "gain_over_predicted", "predicted_gain_flops")}
    record.update(host.fields())
    record["provenance"] = provenance(seed=args.seed)
    m = reference.manifest
    suffix = "_int8heads" if args.int8_heads else ""
    suffix += "" if tuple(names) == SESSION_OPTIONS else "_" + "-".join(names[1:])
    name = f"session_variants_{m.dataset.name}_{m.model.arch}{suffix}.json"
    out = args.out or Path(__file__).parent / "results" / name
    atomic_write_json(out, record)
    print(f"exit agreement with default: {same}")
    parts = [("batch1", "batch 1, µs a request", "realised / predicted", "realised_over_predicted")]
    if args.batch:
        parts.append(("batched", f"batch {args.batch}, µs a batch", "gain over predicted", "gain_over_predicted"))
    for key, title, ratio_name, ratio in parts:
        print(f"{title} (full-depth graph {record[key]['full_graph_us']:.0f}); difference from default "
              f"[95 % interval]; {ratio_name}")
        for name, row in record[key]["variants"].items():
            lo, hi = row["difference_ci95"]
            print(f"  {name:18s} {row['mean']:8.1f}  {row['difference_from_default']:+7.1f} [{lo:+7.1f}, {hi:+7.1f}]  "
                  f"{row[ratio]:.3f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
