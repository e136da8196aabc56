"""What the serving benchmarks share: the model options, the in-process runtime, the server, the machine state.

``serve_overhead.py`` and ``serve_load.py`` serve the same model (a bundle, or the built-in numpy toy
runtime) and describe it, the software stack and the machine load the same way, so their JSONs can be
read side by side. Not a package module: the benchmarks import it as a sibling script.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexit.runtime.types import Runtime
from mexit.serve import ServerProcess
from mexit.serve.testing import ToyRuntime

TOY_FACTORY = "mexit.serve.testing:ToyRuntime"
THREAD_HOP_FACTORY = "mexit.serve.testing:thread_hop"
PREDICT_MODES = ("auto", "inline", "thread")


def add_model_options(p: argparse.ArgumentParser, *, default_out: Path) -> None:
    """The options every serving benchmark takes: which model, on which backend, seed and output file."""
    p.add_argument("--bundle", type=Path, default=None, help="serve this bundle (default: the toy runtime)")
    p.add_argument("--backend", default="onnxruntime", help="runtime backend of the bundle")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument("--toy-shape", default="16", help="toy runtime input shape, e.g. 16 or 3,32,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=default_out)


def toy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the toy runtime the options describe (JSON-able, for ``--factory-kwargs``)."""
    return {"input_shape": [int(d) for d in args.toy_shape.split(",")], "seed": 0}


def describe_model(args: argparse.Namespace) -> dict[str, Any]:
    """The served model, for the JSON."""
    if args.bundle:
        return {"kind": "bundle", "bundle": str(args.bundle), "backend": args.backend, "threads": args.threads}
    return {"kind": "toy", "factory": TOY_FACTORY, **toy_kwargs(args)}


def local_runtime(args: argparse.Namespace) -> Runtime:
    """The same model in this process: the in-process baseline every server number is compared with."""
    if args.bundle:
        from mexit.serve.factory import build_served_runtime

        return build_served_runtime(args.bundle, backend=args.backend, threads=args.threads).runtime
    return ToyRuntime(**toy_kwargs(args))


def _serve_options() -> set[str]:
    """Names of the serving command's options (it gained and lost some while issue 10 was refactored)."""
    from mexit.cli.serve import command

    return {param.name for param in command.params if param.name}


def server_process(args: argparse.Namespace, predict: str = "auto", **options: Any) -> tuple[ServerProcess, str]:
    """A :class:`ServerProcess` for the model, with ``predict`` deciding where the server runs ``predict``.

    Returns the server and how the mode was obtained: the command's own ``--predict`` option when it
    has one; otherwise ``--predict-inline`` for ``inline``, and for ``thread`` the
    :class:`mexit.serve.testing.ThreadHopRuntime` factory, which hands every prediction to the same
    thread pool the server's thread mode uses.
    """
    if predict not in PREDICT_MODES:
        raise SystemExit(f"--modes takes {', '.join(PREDICT_MODES)}; got {predict!r}")
    known = _serve_options()
    extra: list[str] = []
    how = "server default (create_app predict='auto')"
    factory, factory_kwargs = None, None
    if predict != "auto":
        if "predict" in known:
            extra, how = ["--predict", predict], f"--predict {predict}"
        elif predict == "inline":
            extra, how = ["--predict-inline"], "--predict-inline"
        else:
            factory, how = THREAD_HOP_FACTORY, "factory mexit.serve.testing:thread_hop (run_in_threadpool)"
            factory_kwargs = ({"bundle": str(args.bundle), "backend": args.backend, "threads": args.threads}
                              if args.bundle else {"toy": toy_kwargs(args)})
    if factory is None and not args.bundle:
        factory, factory_kwargs = TOY_FACTORY, toy_kwargs(args)
    if factory is not None:
        server = ServerProcess(factory=factory, factory_kwargs=factory_kwargs, model_name="m", extra_args=extra,
                               **options)
    else:
        server = ServerProcess(args.bundle, backend=args.backend, threads=args.threads, model_name="m",
                               extra_args=extra, **options)
    return server, how


def machine_state() -> dict[str, Any]:
    """Cores, load averages and the serving stack: what shapes every latency in the JSON."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("orjson", "httptools", "uvloop")}
    one, five, fifteen = os.getloadavg()
    return {
        "cpu_count": os.cpu_count(),
        "loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)],
        "json": "orjson" if have["orjson"] else "json",
        "uvicorn_http": "httptools" if have["httptools"] else "h11",
        "uvicorn_loop": "uvloop" if have["uvloop"] else "asyncio",
    }


def percentiles_us(samples_ns: np.ndarray) -> dict[str, float]:
    """p50/p90/p99 and mean of nanosecond samples, in microseconds."""
    if samples_ns.size == 0:
        return {"p50_us": float("nan"), "p90_us": float("nan"), "p99_us": float("nan"), "mean_us": float("nan")}
    p = np.percentile(samples_ns, [50, 90, 99]) / 1e3
    return {"p50_us": round(float(p[0]), 1), "p90_us": round(float(p[1]), 1), "p99_us": round(float(p[2]), 1),
            "mean_us": round(float(samples_ns.mean()) / 1e3, 1)}


def _burn(seconds: float) -> None:
    """Keep one core busy for ``seconds`` (a stand-in for a prediction of that length)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _burn_on_request(conn: Any, seconds: float) -> None:
    """Child process of :func:`process_hop_control`: one burst per message, then an answer."""
    while conn.recv() is not None:
        _burn(seconds)
        conn.send(1)


def process_hop_control(burst_s: float, rounds: int = 400) -> dict[str, Any]:
    """What this machine's scheduler alone adds when a ``burst_s`` CPU burst runs in another process.

    A pipe ping-pong with a child that busy-loops ``burst_s`` per message, interleaved with the same
    busy loop in this process: no HTTP, no server, no model. On a quiet machine the difference is a
    few tens of microseconds; on a loaded one, a process that wakes up to compute waits for a core
    and is preempted more often, which no server can avoid. The server's own overhead is what it
    adds beyond this.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_burn_on_request, args=(child, burst_s), daemon=True)
    proc.start()
    try:
        for _ in range(20):
            parent.send(1)
            parent.recv()
        remote = np.empty(rounds, dtype=np.int64)
        local = np.empty(rounds, dtype=np.int64)
        for i in range(rounds):
            t0 = time.perf_counter_ns()
            parent.send(1)
            parent.recv()
            remote[i] = time.perf_counter_ns() - t0
            t0 = time.perf_counter_ns()
            _burn(burst_s)
            local[i] = time.perf_counter_ns() - t0
    finally:
        parent.send(None)
        proc.join(timeout=5)
    rp, lp = np.percentile(remote, [50, 99]), np.percentile(local, [50, 99])
    return {"burst_us": round(burst_s * 1e6, 1), "rounds": rounds, "other_process": percentiles_us(remote),
            "this_process": percentiles_us(local),
            "overhead": {"p50_ms": round(float(rp[0] - lp[0]) / 1e6, 3),
                         "p99_ms": round(float(rp[1] - lp[1]) / 1e6, 3)}}


CIFAR_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-py" / "test_batch"


def cifar_images(n: int, seed: int) -> tuple[np.ndarray, str]:
    """``n`` real CIFAR-10 test images as float32 (n, 3, 32, 32) in [0, 1] (read in place from ../shared/data),
    or seeded random ones of that shape when the data is not there; and which it was."""
    import pickle

    if CIFAR_TEST.exists():
        with open(CIFAR_TEST, "rb") as fh:
            data = pickle.load(fh, encoding="bytes")[b"data"][:n]
        return (data.reshape(-1, 3, 32, 32) / 255.0).astype(np.float32), "cifar10 test_batch"
    rng = np.random.default_rng(seed)
    return rng.random((n, 3, 32, 32)).astype(np.float32), "random 3x32x32 (CIFAR-10 not found)"


def mean_sd(values: list[float | None], fmt: str = ".3f") -> str:
    """``mean ± sd`` over seeds or runs (sample sd, ddof=1, unsigned), the single value, or "–" for none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "–"
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt.lstrip('+')}}" if len(v) > 1 else f"{v[0]:{fmt}}"
