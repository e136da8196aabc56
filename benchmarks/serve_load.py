"""Serving under concurrent load: throughput, latency percentiles, errors and server memory growth.

``--clients`` client processes (default 4), each with its own ``OIPClient`` (one kept-alive
connection), send ``--requests`` batch-1 requests each (default 2000) as fast as the server answers
them. The server is ``python -m mexit.serve`` in a child process; its resident memory (VmRSS from
/proc/<pid>/status) is read after a warm-up and again after the load. Goals: zero errors and memory
growth <= 10 %.

    python benchmarks/serve_load.py [--bundle BUNDLE] [--clients 4] [--requests 2000] [--out PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.serve import OIPClient, ServerProcess

GOAL_MEMORY_GROWTH = 0.10
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve_load.json"


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def client_worker(url: str, model: str, input_shape: tuple[int, ...], requests: int, seed: int,
                  start_at: float, out: Any) -> None:
    """One client process: ``requests`` batch-1 inferences; sends back latencies (ns) and error names."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((64, *input_shape)).astype(np.float32)
    latencies: list[int] = []
    errors: dict[str, int] = {}
    with OIPClient(url, model, timeout_s=30, retries=0) as client:
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


def server_for(args: argparse.Namespace) -> tuple[ServerProcess, tuple[int, ...], dict[str, Any]]:
    if args.bundle:
        server = ServerProcess(args.bundle, backend=args.backend, threads=args.threads, model_name="m")
        return server, (), {"kind": "bundle", "bundle": str(args.bundle), "backend": args.backend,
                            "threads": args.threads}
    shape = [int(d) for d in args.toy_shape.split(",")]
    kwargs = {"input_shape": shape, "seed": 0}
    server = ServerProcess(factory="mexit.serve.testing:ToyRuntime", factory_kwargs=kwargs, model_name="m")
    return server, tuple(shape), {"kind": "toy", "factory": "mexit.serve.testing:ToyRuntime", **kwargs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    server, shape, described = server_for(args)
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
                                                           args.seed + c, start_at, sender))
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
        "runtime": described,
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
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "note": "clients and server share the machine's cores (and other users' load): numbers are noisy",
        "provenance": provenance(seed=args.seed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="serve this bundle (default: the toy runtime)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--toy-shape", default="16", help="toy runtime input shape, e.g. 16 or 3,32,32")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=2000, help="requests per client")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    result = run(args)
    atomic_write_json(args.out, result)
    lat, rss = result["latency_us"], result["server_rss_kib"]
    print(f"{result['runtime']['kind']} runtime, {args.clients} clients x {args.requests} requests: "
          f"{result['throughput_rps']:.0f} req/s, latency p50/p90/p99 {lat['p50']:.0f}/{lat['p90']:.0f}/"
          f"{lat['p99']:.0f} us, {result['errors']} errors")
    print(f"  server RSS {rss['before']} -> {rss['after']} KiB ({rss['growth']:+.1%}); goal "
          f"{'met' if result['goal']['met'] else 'NOT met'} -> {args.out}")


if __name__ == "__main__":
    main()
