"""Adversary 2's exit stealing against a separately trained shadow deployment, plain and jittery serving stacks.

The realistic setting of issues 11 (item 6) and 16: the target bundle and a *separately trained* shadow
bundle of the same architecture (trained on the shadow split) are each served in their own process —
either by mexit's own server (``plain``) or behind :mod:`mexit.serve.jitter` (``jittery``: a serving
stack that adds a lognormal overhead, median ``--overhead-ms``, with rare spikes). The attacker's query
sets are drawn as an attack draws them: half members (the run's ``*_train``), half non-members
(``*_test``), ``--samples`` per deployment, no stratification by exit. Shadow and target are queried in
one interleaved, randomised schedule (:func:`mexit.attacks.collect.collect_interleaved`), so the host's
drift falls on both alike.

Per deployment kind: (1) **fixed** ``--repeats`` queries per sample: every stealer of
:func:`mexit.attacks.stealing.steal_exits` with accuracy, balanced accuracy (mean recall over the exits
the target samples took), per-exit recall and chance (the majority exit's share), the stealer adversary 2
chose by cross-validation on its shadow, and the estimated shadow→target offset; the jitter measured on the
shadow and the queries it plans for the target (:func:`mexit.attacks.stealing.describe_jitter`);
(2) **fixed, first B repeats** for every budget B (the same recording truncated: what a fixed budget of B
buys); (3) **adaptive** querying with mean budget B (:class:`mexit.attacks.collect.Adaptive`, sequential
test on the shadow-fitted timing model), each target query followed by one query to the shadow
(:class:`mexit.attacks.collect.ShadowPacer`, the recording's traffic mix; ``--unpaced-budgets`` repeats some
budgets without it); (4) with both kinds, the Bayes-optimal stealer's balanced accuracy behind the jitter at
each fixed query count (:mod:`mexit.attacks.query_bound`).

    python benchmarks/adversary2_stealing.py --target-bundle TB --target-run TR --shadow-bundle SB \\
        --shadow-run SR [--kinds plain,jittery] [--repeats 10] [--budgets 4,8,16] [--samples 200]

Also reachable as ``benchmarks/stealing_accuracy.py --bundle TB --run TR --shadow-bundle SB --shadow-run SR``.
Keep it to a few hundred samples: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.attacks.collect import Adaptive, Deployment, collect_interleaved, collect_signals
from mexit.attacks.flow import chance_accuracy, paced_centres, stealing_score
from mexit.attacks.pacing import ShadowPacer
from mexit.attacks.query_bound import repeated_query_bound
from mexit.attacks.signals import Signals
from mexit.attacks.stealing import describe_jitter, fit_timing_model, steal_exits
from mexit.runtime import EarlyExitRuntime
from mexit.serve import OIPClient, ServerProcess

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "adversary2_stealing.json"
JITTER_FACTORY = "mexit.serve.jitter:jittery_bundle"
log = logging.getLogger("adversary2_stealing")


def attack_pool(run_dir: Path, role: str, n: int, rng: np.random.Generator, data_root: str | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, member, dataset index): ``n // 2`` members from ``{role}_train``, the rest from ``{role}_test``."""
    from mexit.data import Splits, load_dataset

    config = json.loads((run_dir / "config.json").read_text())["config"]
    dataset = load_dataset(config["dataset"], data_root or config.get("data_root"))
    splits = Splits.load(run_dir / "splits.npz")
    members = rng.choice(getattr(splits, f"{role}_train"), n // 2, replace=False)
    others = rng.choice(getattr(splits, f"{role}_test"), n - n // 2, replace=False)
    idx = np.r_[members, others]
    x = dataset.x[idx]
    x = x.astype(np.float32) / 255.0 if dataset.kind == "image" else x.astype(np.float32)
    return x, dataset.y[idx].astype(np.int64), np.r_[np.ones(len(members), bool), np.zeros(len(others), bool)], idx


def stealing_rows(target: np.ndarray, shadow: Signals, truth: np.ndarray, num_exits: int, seed: int, *,
                  adaptive: bool = False, centres: tuple[Any, Any] = (None, None)) -> dict[str, Any]:
    """Every stealer on ``target`` timings (fitted on the shadow's; the likelihood model re-centred on
    ``centres``, the pacer's), with chance and per-exit recall."""
    res = steal_exits(target, shadow.latency_ns, shadow.true_exit, num_exits, seed, adaptive=adaptive,
                      centres=centres[0], centre_weights=centres[1])
    used = np.unique(truth)
    rows = {name: stealing_score(truth, pred, num_exits) for name, pred in res.stolen.items()}
    return {"chance": chance_accuracy(truth), "chance_balanced": 1.0 / len(used),
            "target_exit_counts": np.bincount(truth, minlength=num_exits).tolist(),
            "chosen": res.choice.name, "stealers": rows, "choice": res.describe()}


class _QueryLog:
    """A client proxy that keeps every answer's round-trip time in the order sent (``--save-signals``), so a
    saved adaptive recording can be replayed in time (each target query is followed by one pacing query)."""

    def __init__(self, client: OIPClient) -> None:
        self.client, self.rtt_ns = client, []

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> Any:
        res = self.client.infer(x, outputs)
        self.rtt_ns.append(int(res.rtt_ns))
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def servers(kind: str, bundle: Path, args: argparse.Namespace, seed: int) -> ServerProcess:
    if kind == "plain":
        return ServerProcess(bundle, threads=args.threads, model_name="m", backend_opts={"int8_heads": args.int8_heads})
    return ServerProcess(factory=JITTER_FACTORY, model_name="m",
                         factory_kwargs={"bundle": str(bundle), "overhead_ms": args.overhead_ms,
                                         "sigma": args.jitter_sigma, "spike_p": args.spike_p,
                                         "spike_ms": args.spike_ms, "seed": seed, "threads": args.threads,
                                         "backend_opts": {"int8_heads": args.int8_heads}})


def analyse_fixed(kind: str, shadow: Signals, target: Signals, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that needs only the fixed-repeat recording: stealers at R and at the first B repeats."""
    num_exits = target.num_exits
    truth = target.true_exit
    out: dict[str, Any] = {"kind": kind,
                           "shadow_exit_counts": np.bincount(shadow.true_exit, minlength=num_exits).tolist()}
    out["jitter_on_shadow"] = describe_jitter(shadow.latency_ns, shadow.true_exit, num_exits)
    out["fixed"] = {"queries_per_sample": int(target.latency_ns.shape[1]),
                    **stealing_rows(target.latency_ns, shadow, truth, num_exits, args.seed)}
    log.info("%s fixed %d: chosen %s balanced %.3f", kind, target.latency_ns.shape[1], out["fixed"]["chosen"],
             out["fixed"]["stealers"]["chosen"]["balanced_accuracy"])
    out["fixed_truncated"] = {}
    for b in args.budgets:
        if b < target.latency_ns.shape[1]:
            cut = np.asarray(target.latency_ns[:, :b], dtype=np.float64)
            sh = replace(shadow, latency_ns=shadow.latency_ns[:, :b])
            out["fixed_truncated"][str(b)] = {"queries_per_sample": b,
                                               **stealing_rows(cut, sh, truth, num_exits, args.seed)}
    return out


def run_kind(kind: str, args: argparse.Namespace, pools: dict[str, tuple], runtimes: dict[str, EarlyExitRuntime],
             keep: list[Signals] | None = None) -> dict[str, Any]:
    """Record one deployment kind (fixed repeats, then adaptive per budget); ``keep`` receives the fixed target
    recording."""
    num_exits = runtimes["target"].num_exits
    with servers(kind, args.target_bundle, args, args.seed) as ts, servers(kind, args.shadow_bundle, args,
                                                                            args.seed + 1) as ss, \
            OIPClient(ts.url, ts.model_name, timeout_s=30) as tc, OIPClient(ss.url, ss.model_name, timeout_s=30) as sc:
        t0 = time.perf_counter()
        deps = {role: Deployment(client, *pools[role][:3], sample_index=pools[role][3],
                                 true_exit_runtime=runtimes[role], meta={"role": role, "kind": kind})
                for role, client in (("shadow", sc), ("target", tc))}
        sig = collect_interleaved(deps, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                  progress=args.progress)
        shadow, target = sig["shadow"], sig["target"]
        if keep is not None:
            keep.append(target)
        collect_s = round(time.perf_counter() - t0, 1)
        if args.save_signals:
            for role, s in sig.items():
                s.save(args.save_signals / f"{kind}_{role}.npz")
        truth = target.true_exit
        out = {**analyse_fixed(kind, shadow, target, args), "fixed_collect_s": collect_s}
        model = fit_timing_model(shadow.latency_ns, shadow.true_exit, num_exits, seed=args.seed)
        out["adaptive"], out["adaptive_unpaced"] = {}, {}
        runs = [(b, True) for b in args.budgets] + [(b, False) for b in args.unpaced_budgets]
        for b, paced in runs:
            t0 = time.perf_counter()
            x, y, member, idx = pools["target"]
            pacer = ShadowPacer(sc, pools["shadow"][0], seed=args.seed + b, share=args.pace_share,
                                exits=shadow.true_exit, num_exits=num_exits) if paced else None
            client = _QueryLog(tc) if args.save_signals else tc
            adaptive = collect_signals(client, x, y, member, warmup=args.warmup, seed=args.seed + 10 + b,
                                       sample_index=idx, true_exit_runtime=runtimes["target"], progress=args.progress,
                                       adaptive=Adaptive(model, query_budget=b, confidence=args.confidence,
                                                         offset=not args.no_offset, pace=pacer,
                                                         drift_correction=not args.no_drift_correction))
            row = {**adaptive.meta["adaptive"], "collect_s": round(time.perf_counter() - t0, 1),
                   **stealing_rows(adaptive.drift_corrected_latency_ns(), shadow, truth, num_exits, args.seed,
                                   adaptive=True, centres=paced_centres(adaptive))}
            if adaptive.latency_drift_ns is not None:  # the same recording read without the pacer's drift/centres
                raw = stealing_rows(adaptive.latency_ns, shadow, truth, num_exits, args.seed, adaptive=True)
                row["without_drift_correction"] = {"chosen": raw["chosen"], "stealers": raw["stealers"]}
            post = replace(model, offset=tuple(row["offset"] or (0.0, 1.0)))
            cent, weights = paced_centres(adaptive)
            if cent is not None:
                post = replace(post.recentred(cent, weights), offset=post.offset)
            row["sequential_model_balanced_accuracy"] = stealing_score(
                truth, post.predict(adaptive.drift_corrected_latency_ns()), num_exits)["balanced_accuracy"]
            out["adaptive" if paced else "adaptive_unpaced"][str(b)] = row
            if args.save_signals:
                tag = f"{kind}_adaptive{'' if paced else '_unpaced'}_b{b:g}"
                adaptive.save(args.save_signals / f"{tag}.npz")
                if pacer is not None:
                    rows, rtt = pacer.answers
                    np.savez(args.save_signals / f"{tag}_pacer.npz", rows=rows, rtt_ns=rtt,
                             target_rtt_ns=np.asarray(client.rtt_ns, dtype=np.int64))
            log.info("%s adaptive %g (%s): %.2f queries/sample, chosen %s balanced %.3f, likelihood %.3f", kind, b,
                     "paced" if paced else "unpaced", row["mean_queries"], row["chosen"],
                     row["stealers"]["chosen"]["balanced_accuracy"], row["stealers"]["likelihood"]["balanced_accuracy"])
    return out


def jittery_bound(plain_target: Signals, args: argparse.Namespace) -> dict[str, Any]:
    """An upper bound on any stealer's balanced accuracy behind the jitter, at each fixed query count.

    Each exit's clean time is taken as a point (its median on the plain server's target recording) and the
    only noise is the jitter model the jittery deployment used (a million draws): the Bayes-optimal stealer
    of :mod:`mexit.attacks.query_bound` facing the stack's jitter *alone*. Real recordings add the host's own
    noise on top, so no stealer does better at that query count. At a budget ``B`` a fixed-``B`` stealer is held
    to the value at ``B``; an adaptive one (mean ``B``, at most ``4B`` per sample) only to the value at ``4B``.
    """
    from mexit.serve.jitter import JitterModel

    lat = np.asarray(plain_target.latency_ns, dtype=np.float64) / 1e9
    centres = []
    for k in range(plain_target.num_exits):
        v = lat[plain_target.true_exit == k]
        v = v[np.isfinite(v)]
        centres.append(np.full(64, float(np.median(v))) if len(v) else np.array([]))
    noise = JitterModel(args.overhead_ms, args.jitter_sigma, args.spike_p, args.spike_ms, seed=args.seed + 99
                        ).draw(1_000_000)
    counts = sorted({1, args.repeats, *[int(b) for b in args.budgets], *[int(4 * b) for b in args.budgets]})
    return {"clean": "per-exit median of the plain target recording, as a point (noise: the jitter alone)",
            "clean_ms": [float(c[0]) * 1e3 if len(c) else None for c in centres], "noise_draws": 1_000_000,
            **repeated_query_bound(centres, noise, counts, seed=args.seed)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-bundle", type=Path)
    p.add_argument("--target-run", type=Path, help="training run of the target (dataset, splits)")
    p.add_argument("--shadow-bundle", type=Path, help="a separately trained shadow's bundle")
    p.add_argument("--shadow-run", type=Path, help="the shadow's training run (role shadow)")
    p.add_argument("--data-root", help="override the runs' data root")
    p.add_argument("--kinds", default="plain,jittery", help="deployments: plain (mexit serve), jittery (test tool)")
    p.add_argument("--samples", type=int, default=200, help="queried samples per deployment (half members)")
    p.add_argument("--repeats", type=int, default=10, help="fixed queries per sample (default 10)")
    p.add_argument("--budgets", default="4,8,16", help="mean query budgets per sample for adaptive querying")
    p.add_argument("--pace-share", type=float, default=1.0,
                   help="paced runs: probability of a shadow query after each target query (default every one)")
    p.add_argument("--unpaced-budgets", default="",
                   help="budgets also run without pacing (no shadow query between target queries), to compare")
    p.add_argument("--confidence", type=float, default=0.95, help="posterior at which a sample stops")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--no-offset", action="store_true",
                   help="adaptive: trust absolute times (shadow and target on the same host and stack)")
    p.add_argument("--no-drift-correction", action="store_true",
                   help="adaptive: decide on raw timings and the shadow recording's centres (the pacer only paces)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--int8-heads", action="store_true",
                   help="target and shadow served with int8 internal heads (mexit serve --backend-opt int8_heads=true)")
    p.add_argument("--overhead-ms", type=float, default=3.0, help="jittery: median added overhead (lognormal)")
    p.add_argument("--jitter-sigma", type=float, default=0.1, help="jittery: lognormal shape")
    p.add_argument("--spike-p", type=float, default=0.01, help="jittery: share of requests with a spike")
    p.add_argument("--spike-ms", type=float, default=5.0, help="jittery: mean spike (exponential)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--save-signals", type=Path)
    p.add_argument("--from-signals", type=Path,
                   help="re-analyse a recording saved with --save-signals (fixed repeats only; no querying)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.from_signals is None and None in (args.target_bundle, args.target_run, args.shadow_bundle,
                                              args.shadow_run):
        p.error("give --target-bundle, --target-run, --shadow-bundle and --shadow-run (or --from-signals DIR)")
    args.budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",") if b]
    args.unpaced_budgets = [float(b) if "." in b else int(b) for b in args.unpaced_budgets.split(",") if b]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.save_signals:
        args.save_signals.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.from_signals is not None:
        kinds = {kind: analyse_fixed(kind, Signals.load(args.from_signals / f"{kind}_shadow.npz"),
                                     Signals.load(args.from_signals / f"{kind}_target.npz"), args)
                 for kind in args.kinds.split(",")}
        extra = {}
        if {"plain", "jittery"} <= set(kinds):  # the jitter parameters are this run's arguments
            extra["jittery_bayes_bound"] = jittery_bound(Signals.load(args.from_signals / "plain_target.npz"), args)
        atomic_write_json(args.out, {"from_signals": str(args.from_signals), "budgets": args.budgets, "kinds": kinds,
                                     **extra,
                                     "elapsed_s": round(time.perf_counter() - started, 1),
                                     "provenance": provenance(benchmark="adversary2_stealing")})
        print(json.dumps({k: {"chosen": r["fixed"]["chosen"], **{n: round(v["balanced_accuracy"], 3) for n, v in
                                                                 r["fixed"]["stealers"].items()}}
                          for k, r in kinds.items()}, indent=1))
        return
    rng = np.random.default_rng(args.seed)
    pools = {"target": attack_pool(args.target_run, "target", args.samples, rng, args.data_root),
             "shadow": attack_pool(args.shadow_run, "shadow", args.samples, rng, args.data_root)}
    runtimes = {"target": EarlyExitRuntime(args.target_bundle, threads=args.threads, int8_heads=args.int8_heads),
                "shadow": EarlyExitRuntime(args.shadow_bundle, threads=args.threads, int8_heads=args.int8_heads)}
    result: dict[str, Any] = {
        "target": {"bundle": str(args.target_bundle), "run": str(args.target_run)},
        "shadow": {"bundle": str(args.shadow_bundle), "run": str(args.shadow_run)},
        "int8_heads": args.int8_heads, "samples_per_deployment": args.samples, "repeats": args.repeats,
        "budgets": args.budgets,
        "confidence": args.confidence, "adaptive_offset": not args.no_offset, "pace_share": args.pace_share,
        "jitter": {"overhead_ms": args.overhead_ms, "sigma": args.jitter_sigma, "spike_p": args.spike_p,
                   "spike_ms": args.spike_ms},
        "kinds": {},
    }
    plain_target: list[Signals] = []
    for kind in args.kinds.split(","):
        result["kinds"][kind] = run_kind(kind, args, pools, runtimes, keep=plain_target if kind == "plain" else None)
    if plain_target and "jittery" in result["kinds"]:
        result["jittery_bayes_bound"] = jittery_bound(plain_target[0], args)
        log.info("Bayes bound behind the jitter: %s", {n: round(v["balanced_accuracy"], 3) for n, v in
                                                       result["jittery_bayes_bound"]["by_queries"].items()})
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
                         "note": "shared 2-core VM; the 1-min load average at the end of the run"}
    result["provenance"] = provenance(benchmark="adversary2_stealing")
    atomic_write_json(args.out, result)
    summary = {}
    for kind, r in result["kinds"].items():
        summary[kind] = {"chance": r["fixed"]["chance"], f"fixed_{args.repeats}": {
            "chosen": r["fixed"]["chosen"], **{k: round(v["balanced_accuracy"], 3) for k, v in
                                               r["fixed"]["stealers"].items()}}}
        for b, row in r["adaptive"].items():
            summary[kind][f"adaptive_{b}"] = {"mean_queries": round(row["mean_queries"], 2), "chosen": row["chosen"],
                                              **{k: round(v["balanced_accuracy"], 3)
                                                 for k, v in row["stealers"].items()}}
    print(json.dumps({"balanced_accuracy": summary, "elapsed_s": result["elapsed_s"], "out": str(args.out)},
                     indent=1))


if __name__ == "__main__":
    main()
