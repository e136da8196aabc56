"""Serving under concurrent load: throughput, latency percentiles, errors and server memory growth.

``--clients`` client processes (default 4), each with its own ``OIPClient`` (one kept-alive
connection), send ``--requests`` batch-1 requests each (default 2000) as fast as the server answers
them, with the binary tensor data extension (``--wire json`` for JSON data). The server is
``python -m mexit.serve`` in a child process in its default mode (fast batches predicted on the event
loop; ``--predict`` to change it); its resident memory (VmRSS from /proc/<pid>/status) is read after
a warm-up and again after the load. The baseline, measured in the same run, is the same number of
batch-1 predictions in-process, one after the other. Goals: zero errors and memory growth <= 10 %.

    python benchmarks/serve_load.py [--bundle BUNDLE] [--clients 4] [--requests 2000] [--out PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
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
    server_process,
)

from mexit._io import atomic_write_json, provenance
from mexit.serve import OIPClient

GOAL_MEMORY_GROWTH = 0.10
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve_load.json"


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def client_worker(url: str, model: str, input_shape: tuple[int, ...], requests: int, seed: int,
                  start_at: float, binary: bool, out: Any) -> None:
    """One client process: ``requests`` batch-1 inferences; sends back latencies (ns) and error names."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((64, *input_shape)).astype(np.float32)
    latencies: list[int] = []
    errors: dict[str, int] = {}
    with OIPClient(url, model, timeout_s=30, retries=0, binary=binary) as client:
        client.infer(inputs[:1])  # connect before the synchronised start
        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.perf_counter()
        for i in range(requests):
            try:
                latencies.append(client.infer(inputs[i % len(inputs)][None]).rtt_ns)
            except Exception as exc:  # counted, not fatal: the benchmark reports errors
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        elapsed = time.perf_counter() - t0
    out.send({"latencies": latencies, "errors": errors, "elapsed_s": elapsed})
    out.close()


def in_process_baseline(args: argparse.Namespace, total: int) -> dict[str, Any]:
    """``total`` batch-1 predictions one after the other in this process: what the server competes with."""
    runtime = local_runtime(args)
    inputs = np.random.default_rng(args.seed).standard_normal((64, *runtime.input_shape)).astype(np.float32)
    for i in range(min(args.warmup, total)):
        runtime.predict(inputs[i % 64][None])
    times = np.empty(total, dtype=np.int64)
    start = time.perf_counter()
    for i in range(total):
        t0 = time.perf_counter_ns()
        runtime.predict(inputs[i % 64][None])
        times[i] = time.perf_counter_ns() - t0
    wall = time.perf_counter() - start
    p = np.percentile(times, [50, 99]) / 1e3
    return {"predictions": total, "throughput_rps": round(total / wall, 1),
            "latency_us": {"p50": round(float(p[0]), 1), "p99": round(float(p[1]), 1)}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    server, how = server_process(args, args.predict)
    shape: tuple[int, ...] = ()
    binary = args.wire == "binary"
    machine_before = machine_state()
    ctx = mp.get_context("spawn")  # clean client processes, no inherited server state
    with server:
        with OIPClient(server.url, server.model_name) as warm:
            if not shape:
                shape = tuple(warm.metadata()["inputs"][0]["shape"][1:])
            x = np.zeros((1, *shape), dtype=np.float32)
            for _ in range(args.warmup):
                warm.infer(x)
        rss_before = rss_kib(server.pid)
        start_at = time.time() + 2.0 + 0.5 * args.clients  # after every client has imported and connected
        pipes, procs = [], []
        for c in range(args.clients):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=client_worker, args=(server.url, server.model_name, shape, args.requests,
                                                           args.seed + c, start_at, binary, sender))
            proc.start()
            sender.close()
            pipes.append(receiver)
            procs.append(proc)
        reports = [pipe.recv() for pipe in pipes]
        for proc in procs:
            proc.join()
        wall_s = max(r["elapsed_s"] for r in reports)
        rss_after = rss_kib(server.pid)
        alive = server.running()
    latencies = np.concatenate([np.asarray(r["latencies"], dtype=np.int64) for r in reports])
    errors: dict[str, int] = {}
    for r in reports:
        for name, count in r["errors"].items():
            errors[name] = errors.get(name, 0) + count
    growth = (rss_after - rss_before) / rss_before
    p = np.percentile(latencies, [50, 90, 99]) / 1e3 if latencies.size else [float("nan")] * 3
    error_count = sum(errors.values())
    return {
        "benchmark": "serve_load",
        "model": describe_model(args),
        "predict": {"mode": args.predict, "how": how},
        "wire": args.wire,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "ok_requests": int(latencies.size),
        "errors": error_count,
        "errors_by_type": errors,
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(latencies.size / wall_s, 1),
        "latency_us": {"p50": round(float(p[0]), 1), "p90": round(float(p[1]), 1), "p99": round(float(p[2]), 1)},
        "server_rss_kib": {"before": rss_before, "after": rss_after, "growth": round(growth, 4)},
        "server_alive_after": alive,
        "goal": {"errors": 0, "memory_growth_max": GOAL_MEMORY_GROWTH,
                 "met": bool(error_count == 0 and growth <= GOAL_MEMORY_GROWTH and alive)},
        "baseline_in_process": in_process_baseline(args, args.clients * args.requests),
        "machine": {"before": machine_before, "after": machine_state()},
        "note": "clients and server share the machine's cores (and other users' load): numbers are noisy",
        "provenance": provenance(seed=args.seed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p, default_out=DEFAULT_OUT)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=2000, help="requests per client")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--wire", choices=["binary", "json"], default="binary", help="tensor data encoding")
    p.add_argument("--predict", choices=["auto", "inline", "thread"], default="auto",
                   help="where the server runs predict (see create_app)")
    args = p.parse_args()
    result = run(args)
    atomic_write_json(args.out, result)
    lat, rss = result["latency_us"], result["server_rss_kib"]
    print(f"{result['model']['kind']} model ({args.wire}, predict {args.predict}), {args.clients} clients x "
          f"{args.requests} requests: "
          f"{result['throughput_rps']:.0f} req/s, latency p50/p90/p99 {lat['p50']:.0f}/{lat['p90']:.0f}/"
          f"{lat['p99']:.0f} us, {result['errors']} errors")
    print(f"  server RSS {rss['before']} -> {rss['after']} KiB ({rss['growth']:+.1%}); goal "
          f"{'met' if result['goal']['met'] else 'NOT met'}; in-process baseline "
          f"{result['baseline_in_process']['throughput_rps']:.0f} predictions/s -> {args.out}")


if __name__ == "__main__":
    main()
