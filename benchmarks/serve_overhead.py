"""Serving overhead: the loopback round trip through the OIP server minus the same call in-process.

For each server mode (``--modes``: ``auto``, the server default, runs fast batches on the event loop;
``thread`` always hands ``predict`` to a worker thread; ``inline`` always runs it on the loop) one
server child process (``mexit serve``, 127.0.0.1, kept-alive connections) is started, and
every iteration sends the same sample three ways: in-process (``LocalClient``, a direct
``runtime.predict``: the baseline, measured in the same run), over HTTP with JSON tensor data, and
over HTTP with the binary tensor data extension. The order rotates each iteration so that drift on a
shared machine biases all three alike. Reported per mode and wire: p50/p90/p99 of the round trip, of
the in-process call and of the per-pair difference; the goal check is p50(remote) - p50(local)
<= 0.5 ms and p99(remote) - p99(local) <= 2 ms at batch 1 in the default set-up (``auto``, binary).

A control measured in the same run says what the machine alone adds: the same CPU time spent in
another process reached over a pipe (no HTTP, no server) versus in this one. On a loaded machine a
process that wakes up to compute waits for a core; the server's own overhead is what it adds beyond.

It also checks that the timing an attacker sees stays faithful: the samples' exits are known from the
in-process call, and the per-exit medians of the remote round trip should rise with the exit like
the in-process ones (meaningful for a bundle; the toy runtime computes every exit for every sample).

    python benchmarks/serve_overhead.py [--bundle BUNDLE] [--requests 2000] [--modes auto,thread] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # a sibling script, importable once its folder is on sys.path
    add_model_options,
    describe_model,
    local_runtime,
    machine_state,
    percentiles_us,
    process_hop_control,
    server_process,
)

from mexit._io import atomic_write_json, provenance
from mexit.runtime.types import Runtime
from mexit.serve import LocalClient, OIPClient
from mexit.serve.app import DEFAULT_INLINE_BELOW_MS, plan_prediction

GOAL_P50_MS = 0.5
GOAL_P99_MS = 2.0
WIRES = ("json", "binary")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve_overhead.json"
MIN_PER_EXIT = 20  # fewer samples at an exit than this: no median reported for it


def pick_inputs(args: argparse.Namespace, runtime: Runtime) -> tuple[np.ndarray, str]:
    """``--distinct`` inputs and a description of where they come from.

    With ``--dataset``, records drawn at random from it: the exits they take are the model's natural
    mix. Without, synthetic candidates (standard-normal vectors and 0/1 vectors of random density)
    taken round-robin over the exits they reach, so that the per-exit timing check has samples at
    every exit that some input reaches.
    """
    rng = np.random.default_rng(args.seed)
    if args.dataset:
        from mexit.data.registry import load_dataset

        data = load_dataset(args.dataset, args.data_root)
        rows = rng.choice(len(data.x), size=min(args.distinct, len(data.x)), replace=False)
        return np.ascontiguousarray(data.x[rows], dtype=np.float32), f"{args.dataset}: {len(rows)} random records"
    shape = tuple(runtime.input_shape)
    half = max(args.distinct, 1024)
    normal = rng.standard_normal((half, *shape)).astype(np.float32)
    density = rng.uniform(0.01, 0.6, size=(half,) + (1,) * len(shape))
    binary = (rng.random((half, *shape)) < density).astype(np.float32)
    pool = np.concatenate([normal, binary])
    exits = np.concatenate([runtime.predict(pool[i:i + 256]).exit_index for i in range(0, len(pool), 256)])
    by_exit = [rng.permutation(np.flatnonzero(exits == k)) for k in np.unique(exits)]
    order = [group[i] for i in range(max(len(g) for g in by_exit)) for group in by_exit if i < len(group)]
    return pool[np.asarray(order[:args.distinct])], "synthetic, balanced over the exits they reach"


def exit_timing(exits: np.ndarray, local_ns: np.ndarray, remote_ns: dict[str, np.ndarray],
                seed: int = 0) -> dict[str, Any]:
    """Per-exit medians of the in-process and remote round trips, and whether they rise with the exit."""
    rows = []
    for k in np.unique(exits):
        mask = exits == k
        if mask.sum() < MIN_PER_EXIT:
            continue
        row = {"exit": int(k), "n": int(mask.sum()), "local_p50_us": round(float(np.median(local_ns[mask])) / 1e3, 1)}
        for wire, ns in remote_ns.items():
            row[f"remote_{wire}_p50_us"] = round(float(np.median(ns[mask])) / 1e3, 1)
        rows.append(row)

    def rising(key: str) -> bool | None:
        values = [r[key] for r in rows]
        return None if len(values) < 2 else bool(all(b > a for a, b in itertools.pairwise(values)))

    kept = np.isin(exits, [r["exit"] for r in rows])
    stealing = {"local": exit_from_timing(exits[kept], local_ns[kept], seed)}
    stealing.update({f"remote_{wire}": exit_from_timing(exits[kept], ns[kept], seed) for wire, ns in remote_ns.items()})
    return {"per_exit": rows, "local_rises_with_exit": rising("local_p50_us"),
            **{f"remote_{wire}_rises_with_exit": rising(f"remote_{wire}_p50_us") for wire in remote_ns},
            "exit_from_one_timing": stealing}


def exit_from_timing(exits: np.ndarray, ns: np.ndarray, seed: int) -> dict[str, float] | None:
    """How well one response time tells the exit: 5-fold cross-validated balanced accuracy of a depth-4
    decision tree on log(time), next to chance (1 / number of exits). A quick fidelity probe of the
    timing channel (the attacks' stealers use repeated queries), comparable between in-process and
    remote calls of the same run."""
    if len(np.unique(exits)) < 2:
        return None
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    guess = cross_val_predict(DecisionTreeClassifier(max_depth=4, random_state=seed),
                              np.log(ns.astype(np.float64)).reshape(-1, 1), exits, cv=folds)
    return {"balanced_accuracy": round(float(balanced_accuracy_score(exits, guess)), 3),
            "chance": round(1 / len(np.unique(exits)), 3)}


def measure_mode(args: argparse.Namespace, runtime: Runtime, inputs: np.ndarray, mode: str) -> dict[str, Any]:
    """One server in ``mode``; local, JSON and binary requests interleaved in rotating order."""
    server, how = server_process(args, mode)
    local = LocalClient(runtime, expose_exit=True)
    n = args.requests
    local_ns = np.empty(n, dtype=np.int64)
    remote_ns = {wire: np.empty(n, dtype=np.int64) for wire in WIRES}
    exits = np.empty(n, dtype=np.int64)
    with server, OIPClient(server.url, server.model_name, timeout_s=30, binary=False) as json_client, \
            OIPClient(server.url, server.model_name, timeout_s=30, binary=True) as binary_client:
        clients = {"json": json_client, "binary": binary_client}
        check = inputs[: min(8, len(inputs))]  # the server answers exactly what the runtime computes
        for client in clients.values():
            assert np.array_equal(client.infer(check).outputs["probabilities"],
                                  local.infer(check).outputs["probabilities"])
        for i in range(args.warmup):
            x = inputs[i % len(inputs)][None]
            local.infer(x)
            for client in clients.values():
                client.infer(x)
        start = time.perf_counter()
        for i in range(n):
            x = inputs[i % len(inputs)][None].repeat(args.batch, axis=0)
            for step in range(3):
                which = (i + step) % 3
                if which == 0:
                    result = local.infer(x)
                    local_ns[i] = result.rtt_ns
                    exits[i] = int(result.outputs["exit_index"].max())
                else:
                    wire = WIRES[which - 1]
                    remote_ns[wire][i] = clients[wire].infer(x).rtt_ns
        wall_s = time.perf_counter() - start
    local_p = np.percentile(local_ns, [50, 99])
    overhead = {}
    for wire, ns in remote_ns.items():
        remote_p = np.percentile(ns, [50, 99])
        overhead[wire] = {"p50_ms": round(float(remote_p[0] - local_p[0]) / 1e6, 3),
                          "p99_ms": round(float(remote_p[1] - local_p[1]) / 1e6, 3),
                          "paired": percentiles_us(ns - local_ns)}
    return {
        "how": how,
        "wall_s": round(wall_s, 2),
        "local_rtt": percentiles_us(local_ns),
        "remote_rtt": {wire: percentiles_us(ns) for wire, ns in remote_ns.items()},
        "overhead": overhead,
        "exit_timing": exit_timing(exits, local_ns, remote_ns, args.seed),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    runtime = local_runtime(args)
    inputs, inputs_described = pick_inputs(args, runtime)
    # What mode "auto" picks, measured here the way the server measures it at start-up (the server's
    # own choice is made in the child process, out of sight).
    plan = plan_prediction(runtime, mode="auto", inline_below_ms=DEFAULT_INLINE_BELOW_MS, max_batch=1024)
    machine_before = machine_state()
    modes = {mode: measure_mode(args, runtime, inputs, mode) for mode in args.modes.split(",")}
    result: dict[str, Any] = {
        "benchmark": "serve_overhead",
        "model": describe_model(args),
        "baseline": "in-process runtime.predict through LocalClient, interleaved with the remote calls",
        "batch": args.batch,
        "requests": args.requests,
        "warmup": args.warmup,
        "inputs": inputs_described,
        "distinct_inputs": len(inputs),
        "auto_plan_measured_here": plan.as_dict(),
        "modes": modes,
    }
    first = next(iter(modes.values()))
    burst_s = first["local_rtt"]["p50_us"] / 1e6
    result["scheduler_control"] = {
        "what": "the in-process p50 as a CPU burst in another process over a pipe, minus the same burst here "
                "(no HTTP, no server): what the machine's scheduling alone adds to a process hop",
        **process_hop_control(burst_s),
    }
    if "auto" in modes:
        default = modes["auto"]["overhead"]["binary"]
        result["goal"] = {"judged_on": "mode auto, binary tensor data (the defaults of mexit serve and OIPClient)",
                          "overhead_p50_ms_max": GOAL_P50_MS, "overhead_p99_ms_max": GOAL_P99_MS,
                          "met": bool(default["p50_ms"] <= GOAL_P50_MS and default["p99_ms"] <= GOAL_P99_MS)}
        result["binary_saves_p50_us"] = round(
            modes["auto"]["remote_rtt"]["json"]["p50_us"] - modes["auto"]["remote_rtt"]["binary"]["p50_us"], 1)
        if "thread" in modes:
            result["auto_saves_vs_thread_p50_us"] = {
                wire: round(modes["thread"]["overhead"][wire]["p50_ms"] * 1e3
                            - modes["auto"]["overhead"][wire]["p50_ms"] * 1e3, 1) for wire in WIRES}
    result["machine"] = {"before": machine_before, "after": machine_state()}
    result["note"] = ("measured on a shared machine (see loadavg): other processes compete for the same cores, "
                      "so compare the modes and wires of one run rather than numbers across runs")
    result["provenance"] = provenance(seed=args.seed)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p, default_out=DEFAULT_OUT)
    p.add_argument("--requests", type=int, default=2000, help="iterations (each: local, JSON and binary)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--distinct", type=int, default=256, help="distinct inputs cycled through")
    p.add_argument("--dataset", default=None, help="draw the inputs from this dataset (e.g. location)")
    p.add_argument("--data-root", default=None, help="where --dataset lives")
    p.add_argument("--modes", default="auto,thread", help="server modes, comma-separated: auto, thread, inline")
    args = p.parse_args()
    result = run(args)
    atomic_write_json(args.out, result)
    machine = result["machine"]["before"]
    print(f"{result['model']['kind']} model, batch {args.batch}, {args.requests} requests "
          f"({machine['uvicorn_http']}, {machine['json']}, loadavg {machine['loadavg']})")
    for mode, m in result["modes"].items():
        loc = m["local_rtt"]
        print(f"  {mode:6s} in-process p50/p99 {loc['p50_us']:.0f}/{loc['p99_us']:.0f} us")
        for wire in WIRES:
            r, o = m["remote_rtt"][wire], m["overhead"][wire]
            print(f"         {wire:6s} remote p50/p99 {r['p50_us']:.0f}/{r['p99_us']:.0f} us; overhead p50 "
                  f"{o['p50_ms']:.3f} ms, p99 {o['p99_ms']:.3f} ms")
        rises = {k: v for k, v in m["exit_timing"].items() if k.endswith("rises_with_exit")}
        print(f"         per-exit medians rise with the exit: {rises}")
        print(f"         exit from one timing (balanced accuracy): {m['exit_timing']['exit_from_one_timing']}")
    control = result["scheduler_control"]
    print(f"  scheduler control ({control['burst_us']:.0f} us burst in another process): overhead p50 "
          f"{control['overhead']['p50_ms']:.3f} ms, p99 {control['overhead']['p99_ms']:.3f} ms")
    if "goal" in result:
        print(f"  goal (auto, binary: p50 <= {GOAL_P50_MS} ms, p99 <= {GOAL_P99_MS} ms): "
              f"{'met' if result['goal']['met'] else 'NOT met'} -> {args.out}")


if __name__ == "__main__":
    main()
