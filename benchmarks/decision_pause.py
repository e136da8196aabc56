"""How a pause on the client (an adaptive-querying decision step) slows the target's next answers.

Adaptive querying (:class:`mexit.attacks.collect.Adaptive`) stops between rounds to decide which samples to ask
again: about 10 ms of numpy on the client (calibration, posteriors), during which both servers sit idle. Late
in a run, when only a few uncertain samples are left, that happens every few queries. This benchmark measures
what it does to the next target query, against the paced steady state (target query, then one shadow query):
samples of three exits, queried in blocks of 30 per mode, the modes interleaved:

* ``paced`` — no pause;
* ``pause`` — ``--pause-ms`` of client numpy before the target query;
* ``pause+N primers`` — the pause, then N unrecorded (target, shadow) query pairs, then the target query.

Both bundles are served behind the jittery test stack (:mod:`mexit.serve.jitter`), as in
``benchmarks/adversary2_stealing.py``::

    python benchmarks/decision_pause.py --target-bundle /tmp/a2/tb --target-run /tmp/a2/t --shadow-bundle /tmp/a2/sb
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.runtime import EarlyExitRuntime
from mexit.serve import OIPClient, ServerProcess

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decision_pause.json"
JITTER_FACTORY = "mexit.serve.jitter:jittery_bundle"
MODES = ("paced", "pause", "pause+1 primers", "pause+2 primers")


def _server(bundle: Path, seed: int) -> ServerProcess:
    return ServerProcess(factory=JITTER_FACTORY, model_name="m",
                         factory_kwargs={"bundle": str(bundle), "overhead_ms": 3.0, "sigma": 0.1, "spike_p": 0.01,
                                         "spike_ms": 5.0, "seed": seed, "threads": 1})


def _samples(run: Path, bundle: Path, exits: tuple[int, ...], per_exit: int) -> dict[int, np.ndarray]:
    from mexit.data import Splits, load_dataset

    config = json.loads((run / "config.json").read_text())["config"]
    data = load_dataset(config["dataset"], config.get("data_root"))
    x = data.inputs(Splits.load(run / "splits.npz").target_test[:1000])
    taken = EarlyExitRuntime(bundle, threads=1).predict(x).exit_index
    return {e: x[np.flatnonzero(taken == e)[:per_exit]] for e in exits if (taken == e).any()}


def _busy(seconds: float, work: np.ndarray) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.exp(-work).sum(axis=1)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    pools = _samples(args.target_run, args.target_bundle, tuple(args.exits), 3)
    rng = np.random.default_rng(args.seed)
    work = rng.random((400, 80))
    times: dict[str, dict[int, list[int]]] = {m: {e: [] for e in pools} for m in MODES}
    spare = next(iter(pools.values()))[:1]
    with _server(args.target_bundle, args.seed) as ts, _server(args.shadow_bundle, args.seed + 1) as ss, \
            OIPClient(ts.url, "m") as tc, OIPClient(ss.url, "m") as sc:
        for _ in range(50):
            tc.infer(spare)
            sc.infer(spare)
        for block in range(args.blocks):
            mode = MODES[block % len(MODES)]
            for _ in range(30):
                e = list(pools)[rng.integers(len(pools))]
                x = pools[e][rng.integers(len(pools[e]))][None]
                if mode != "paced":
                    _busy(args.pause_ms / 1e3, work)
                for _ in range(int(mode.split("+")[1][0]) if "primers" in mode else 0):
                    tc.infer(spare)
                    sc.infer(spare)
                times[mode][e].append(int(tc.infer(x).rtt_ns))
                sc.infer(spare)  # the pacing query after it
    base = {e: float(np.median(v)) for e, v in times["paced"].items()}
    return {m: {str(e): {"median_us": float(np.median(v)) / 1e3, "excess_us": (float(np.median(v)) - base[e]) / 1e3,
                         "queries": len(v)} for e, v in by_exit.items()} for m, by_exit in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-bundle", type=Path, required=True)
    p.add_argument("--target-run", type=Path, required=True, help="the target's training run (its test split)")
    p.add_argument("--shadow-bundle", type=Path, required=True)
    p.add_argument("--exits", type=int, nargs="+", default=[1, 4, 5])
    p.add_argument("--pause-ms", type=float, default=10.0, help="client work before a target query (a decision step)")
    p.add_argument("--blocks", type=int, default=80, help="blocks of 30 queries, modes in turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    load = os.getloadavg()
    record = {"benchmark": "decision_pause", "pause_ms": args.pause_ms, "modes": measure(args),
              "load_average_before_after": [load[0], os.getloadavg()[0]], "cpus": os.cpu_count(),
              "provenance": provenance(seed=args.seed)}
    atomic_write_json(args.out, record)
    print(json.dumps(record["modes"], indent=1))


if __name__ == "__main__":
    main()
