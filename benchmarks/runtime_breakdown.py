"""Where a batch-1 early exit spends its time beyond its FLOPs: backbone, heads and decision, ``If`` nesting, Python.

For every exit k, on the run's test samples, each configuration timed in blocks (every sample through one
configuration, then the next, in a fresh random order per repeat: a deployment's steady state), one ONNX
Runtime thread:

* ``backbone``: the stages' backbones alone (heads cut off with ``onnx.utils.extract_model``) chained by the same
  nested ``If`` nodes as the early-exit graph, leaving at exit k (its condition fed ``True``, the earlier ones
  ``False``; the exit branch is one ``ReduceMean`` of the features), boundaries handed over in ONNX Runtime's
  blocked layout as the runtime does (:func:`mexit.runtime.layout.hand_over_blocked`, session 11);
* ``single_float32`` / ``single_int8_heads``: the runtime's single early-exit graph forced to exit k, run with
  ``session.run`` (no runtime Python), heads in float32 / with ``int8_heads`` (:mod:`mexit.runtime.quantize`);
  ``single_int8_heads_reordered``: the same without the blocked hand-over (every boundary reordered to NCHW and
  back, as before session 11);
* ``runtime_int8_heads``: ``EarlyExitRuntime.predict(x, force_exit=k)`` with int8 heads (the Python around it);
* once: the bundle's full-depth graph (one flat graph, no heads), next to the nested backbone at the last exit —
  what the nesting itself costs.

So ``single - backbone`` is what the heads and the exit decisions add at exit k, ``runtime - single`` is the
runtime's Python, and ``nested - flat`` is the price of ``If`` nesting, which no head optimisation can win back.

``nesting_split`` (session 10) takes that price apart on the last exit's path, one sample, interleaved rounds:
the bundle's full-depth graph; the backbone stages concatenated into one flat graph (each stage as the runtime
rewrites it: a residual stage's skip read through an identity 1×1 convolution, :mod:`mexit.runtime.layout`); the
same with a ``Reshape`` at every stage boundary, which forces ONNX Runtime out of its blocked (NCHWc) layout and
back, as an ``If`` boundary does; and the nested ``If`` chain — with the skip routed through the identity
convolution, through a depthwise 1×1 convolution of ones (a cheaper identity the layout transformer also converts),
or not routed at all, and (session 11, the runtime's default) with the boundaries handed over blocked.

``at_natural_exits`` turns these into the goal's unit: each sample timed at its own exit under each configuration,
as realised / FLOPs-predicted speed-up. ``backbone`` is the ceiling if heads, decisions and Python cost nothing.

    python benchmarks/runtime_breakdown.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--out …]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from onnx import TensorProto, compose, helper, utils
from runtime_latency import (  # a sibling script, importable once its folder is on sys.path
    add_test_split_options,
    blocked_per_sample,
    held_out,
)

from mexit._io import atomic_write_json, provenance
from mexit.bundle import load_bundle
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import _stage_graphs, early_exit_graph, session_options
from mexit.runtime.layout import hand_over_blocked


def _session(model: bytes | Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options(threads=threads),
                                providers=["CPUExecutionProvider"])


def _depthwise_skips(model: onnx.ModelProto) -> onnx.ModelProto:
    """The identity 1×1 skip convolutions of :func:`mexit.runtime.layout.route_skips_through_conv` as depthwise 1×1
    convolutions of ones (``group`` = channels): the same values, C times fewer multiplications."""
    from onnx import numpy_helper

    from mexit.runtime.layout import SKIP_CONV_SUFFIX

    weights = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0].endswith(SKIP_CONV_SUFFIX):
            w = weights[node.input[1]]
            channels = w.dims[0]
            w.CopyFrom(numpy_helper.from_array(np.ones((channels, 1, 1, 1), np.float32), w.name))
            node.attribute.append(helper.make_attribute("group", channels))
    return model


def backbone_stages(bundle_dir: Path, tmp: Path, skip: str = "blocked") -> list[onnx.ModelProto]:
    """Each stage's backbone (heads cut off), names prefixed ``s{k}_``, stage k reading stage k-1's features.
    ``skip``: how a residual stage's skip from its input is routed — ``blocked`` (the runtime's default: the identity
    1×1 convolution, then the stage boundaries handed over in ONNX Runtime's blocked layout,
    :func:`mexit.runtime.layout.hand_over_blocked`), ``conv`` (the identity convolution alone, reorders at every
    boundary), ``depthwise`` (:func:`_depthwise_skips`) or ``none`` (the stages as exported)."""
    b = load_bundle(bundle_dir)
    m = b.manifest
    graphs = _stage_graphs(b, skip_conv=skip != "none")
    if skip == "depthwise":
        graphs = [_depthwise_skips(g) for g in graphs]
    cuts = []
    for k, (model, e) in enumerate(zip(graphs, m.exits, strict=True)):
        src, cut = tmp / f"stage{k}_{skip}.onnx", tmp / f"stage{k}_{skip}_backbone.onnx"
        onnx.save(model, str(src))
        utils.extract_model(str(src), str(cut), [e.input_name], [e.feature_output or e.logits_output])
        cuts.append(onnx.load(str(cut)))
    if skip == "blocked":
        cuts, _ = hand_over_blocked(cuts, [e.feature_output for e in m.exits], [e.input_name for e in m.exits])
    stages = [compose.add_prefix(model, f"s{k}_") for k, model in enumerate(cuts)]
    for k in range(1, m.model.num_exits):
        src, dst = f"s{k}_{m.exits[k].input_name}", f"s{k - 1}_{m.exits[k - 1].feature_output}"
        for node in stages[k].graph.node:
            node.input[:] = [dst if name == src else name for name in node.input]
    return stages


def flat_backbone(bundle_dir: Path, tmp: Path, threads: int, *,
                  boundary_reorders: bool) -> Callable[[np.ndarray], object]:
    """The backbone stages as one flat graph (no ``If``), optionally with a ``Reshape`` to the same shape at every
    stage boundary: the layout transformer cannot carry its blocked layout through it, so each boundary costs the
    reorder out and back in that an ``If`` boundary costs."""
    m = load_bundle(bundle_dir).manifest
    stages = backbone_stages(bundle_dir, tmp, "conv")
    nodes, inits = [], []
    for k, stage in enumerate(stages):
        if k and boundary_reorders:
            feature, shape = f"s{k - 1}_{m.exits[k - 1].feature_output}", f"boundary{k}_shape"
            out = next(o for o in stages[k - 1].graph.output if o.name == feature)
            rank = len(out.type.tensor_type.shape.dim) or 4
            dims = [0, -1, *[0] * (rank - 2)]  # the same shape, whatever the features' rank (FCN: 2)
            inits.append(helper.make_tensor(shape, TensorProto.INT64, [rank], dims))
            nodes.append(helper.make_node("Reshape", [feature, shape], [f"{feature}_boundary"]))
            for node in stage.graph.node:
                node.input[:] = [f"{feature}_boundary" if name == feature else name for name in node.input]
        nodes.extend(stage.graph.node)
        inits.extend(stage.graph.initializer)
    x_in, out = f"s0_{m.exits[0].input_name}", f"s{len(stages) - 1}_{m.exits[-1].logits_output}"
    model = helper.make_model(
        helper.make_graph(nodes, "flat", [helper.make_tensor_value_info(x_in, TensorProto.FLOAT,
                                                                        [1, *m.input.sample_shape])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits),
        opset_imports=list(stages[0].opset_import))
    model.ir_version = stages[0].ir_version
    sess = _session(model.SerializeToString(), threads)
    return lambda x: sess.run(None, {x_in: x})


def nested_backbone(bundle_dir: Path, tmp: Path, threads: int,
                    skip: str = "blocked") -> list[Callable[[np.ndarray], object]]:
    """One callable per exit k: the backbone-only stages chained by nested ``If`` nodes as in the early-exit graph,
    leaving at exit k (``skip``: see :func:`backbone_stages`)."""
    m = load_bundle(bundle_dir).manifest
    k_exits = m.model.num_exits
    stages = backbone_stages(bundle_dir, tmp, skip)

    def out(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    last = f"s{k_exits - 1}_{m.exits[-1].logits_output}"
    g = stages[-1].graph
    inner = helper.make_graph([*g.node, helper.make_node("Identity", [last], ["o_last"])], "last", [], [out("o_last")],
                              initializer=list(g.initializer))
    for k in range(k_exits - 2, -1, -1):
        g, feature = stages[k].graph, f"s{k}_{m.exits[k].feature_output}"
        then = helper.make_graph([helper.make_node("ReduceMean", [feature], [f"t{k}"], keepdims=0)], f"then{k}", [],
                                 [out(f"t{k}")])
        result = "result" if k == 0 else f"o{k}"
        nodes = [*g.node, helper.make_node("If", [f"cond{k}"], [result], then_branch=then, else_branch=inner)]
        if k:
            inner = helper.make_graph(nodes, f"stage{k}", [], [out(result)], initializer=list(g.initializer))
    x_in = f"s0_{m.exits[0].input_name}"
    inputs = [helper.make_tensor_value_info(x_in, TensorProto.FLOAT, [1, *m.input.sample_shape])]
    inputs += [helper.make_tensor_value_info(f"cond{j}", TensorProto.BOOL, []) for j in range(k_exits - 1)]
    model = helper.make_model(helper.make_graph(nodes, "nested", inputs, [out("result")],
                                                initializer=list(stages[0].graph.initializer)),
                              opset_imports=list(stages[0].opset_import))
    model.ir_version = stages[0].ir_version
    sess = _session(model.SerializeToString(), threads)
    runs = []
    for k in range(k_exits):
        conds = {f"cond{j}": np.array(j == k) for j in range(k_exits - 1)}
        runs.append(lambda x, c=conds: sess.run(None, {x_in: x, **c}))
    return runs


def nesting_split(bundle_dir: Path, tmp: Path, threads: int, x: np.ndarray, full: ort.InferenceSession, rounds: int,
                  rng: np.random.Generator, calls: int = 100) -> dict:
    """What the nested ``If`` chain costs over the full-depth graph on the last exit's path, taken apart (see the
    module docstring): per configuration the median of ``calls`` back-to-back calls of one sample, in rounds that
    visit the configurations in a fresh random order; medians over rounds, and each configuration's difference to the
    full graph per round."""
    full_in = full.get_inputs()[0].name
    jobs: dict[str, Callable[[np.ndarray], object]] = {
        "full_depth_graph": lambda xi: full.run(None, {full_in: xi}),
        "flat_stages": flat_backbone(bundle_dir, tmp, threads, boundary_reorders=False),
        "flat_stages_boundary_reorders": flat_backbone(bundle_dir, tmp, threads, boundary_reorders=True),
        "nested_if": nested_backbone(bundle_dir, tmp, threads, "conv")[-1],
        "nested_if_blocked_handoff": nested_backbone(bundle_dir, tmp, threads, "blocked")[-1],
        "nested_if_depthwise_skip": nested_backbone(bundle_dir, tmp, threads, "depthwise")[-1],
        "nested_if_unrouted_skip": nested_backbone(bundle_dir, tmp, threads, "none")[-1],
    }
    # the skip routings change only the order of float additions: logits agree to rounding, not bit for bit
    outputs = {name: np.asarray(job(x)[0]) for name, job in jobs.items() if name.startswith("nested")}
    differences = {name: float(np.abs(v - outputs["nested_if"]).max()) for name, v in outputs.items()}
    for job in jobs.values():
        for _ in range(20):
            job(x)
    per_round: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for _ in range(rounds):
        for j in rng.permutation(len(names)):
            job, t = jobs[names[j]], np.empty(calls)
            for i in range(calls):
                t0 = time.perf_counter_ns()
                job(x)
                t[i] = time.perf_counter_ns() - t0
            per_round[names[j]].append(float(np.median(t)) / 1e3)
    base = np.array(per_round["full_depth_graph"])
    return {"rounds": rounds, "calls_per_round": calls, "nested_max_abs_logit_difference": differences,
            "median_us": {n: float(np.median(v)) for n, v in per_round.items()},
            "over_full_graph_us": {n: {"median": float(np.median(np.array(v) - base)),
                                       "per_round": (np.array(v) - base).tolist()}
                                   for n, v in per_round.items() if n != "full_depth_graph"}}


def at_natural_exits(times: dict[str, np.ndarray], exits: np.ndarray, kinds: tuple[str, ...], costs: np.ndarray,
                     full_flops: float) -> dict:
    """What each configuration would realise on the samples' own exits: sample i timed forced to its natural exit
    ``exits[i]`` (median over repeats), mean over samples, as realised / FLOPs-predicted speed-up against the flat
    full-depth graph. ``backbone`` is the ceiling with heads, decisions and Python free (``If`` nesting included);
    each further configuration adds one of them back, ``runtime_int8_heads`` is what ``predict`` realises."""
    rows = np.arange(len(exits))
    full = float(np.median(times["full_depth_graph"], axis=0).mean())
    predicted = full_flops / float(costs[exits].mean())
    mean_ns = {kind: float(np.median(np.stack([times[f"{kind}/{k}"] for k in range(len(costs))]), axis=1)[exits, rows]
                           .mean()) for kind in kinds}
    return {"exit_shares": (np.bincount(exits, minlength=len(costs)) / len(exits)).tolist(),
            "predicted_speedup_flops": predicted, "mean_latency_us": {k: v / 1e3 for k, v in mean_ns.items()},
            "realised_over_predicted": {k: full / v / predicted for k, v in mean_ns.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=300, repeats=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split-rounds", type=int, default=11,
                        help="interleaved rounds of the nesting split (0: skip it)")
    args = parser.parse_args()
    host = HostRun.begin()
    x, _ = held_out(args)
    tmp = Path(tempfile.mkdtemp(prefix="mexit-breakdown-"))
    b = load_bundle(args.bundle)
    m = b.manifest
    k_exits = m.model.num_exits
    names = [e.feature_output for e in m.exits], [e.input_name for e in m.exits]
    int8 = _stage_graphs(b, skip_conv=True, int8_heads=True)
    singles = {  # as the runtime builds them (boundaries handed over blocked), and int8 without the hand-over
        "single_float32": _session(early_exit_graph(b, graphs=hand_over_blocked(_stage_graphs(b, skip_conv=True),
                                                                                *names)[0]), args.threads),
        "single_int8_heads": _session(early_exit_graph(b, graphs=hand_over_blocked(int8, *names)[0]), args.threads),
        "single_int8_heads_reordered": _session(early_exit_graph(b, graphs=int8), args.threads)}
    rt = EarlyExitRuntime(args.bundle, threshold=args.threshold, threads=args.threads, int8_heads=True)
    x_in = f"s0_{m.exits[0].input_name}"
    jobs: dict[str, Callable[[np.ndarray], object]] = {}
    for k, job in enumerate(nested_backbone(args.bundle, tmp, args.threads)):
        jobs[f"backbone/{k}"] = job
        taus = {f"mexit_tau{j}": np.array(-np.inf if j == k else np.inf, np.float32) for j in range(k_exits - 1)}
        for name, sess in singles.items():
            jobs[f"{name}/{k}"] = lambda xi, s=sess, t=taus: s.run(None, {x_in: xi, **t})
        jobs[f"runtime_int8_heads/{k}"] = lambda xi, k=k: rt.predict(xi, force_exit=k)
    full = _session(b.full_path, args.threads)
    full_in = full.get_inputs()[0].name
    jobs["full_depth_graph"] = lambda xi: full.run(None, {full_in: xi})
    times = blocked_per_sample(jobs, x, args.repeats, np.random.default_rng(args.seed))
    split = nesting_split(args.bundle, tmp, args.threads, x[0:1], full, args.split_rounds,
                          np.random.default_rng(args.seed)) if args.split_rounds else None
    med = {name: float(np.median(t, axis=0).mean()) / 1e3 for name, t in times.items()}
    kinds = ("backbone", "single_float32", "single_int8_heads", "single_int8_heads_reordered", "runtime_int8_heads")
    per_exit = []
    for k in range(k_exits):
        row = {kind: med[f"{kind}/{k}"] for kind in kinds}
        row["heads_decision_nesting_float32_us"] = row["single_float32"] - row["backbone"]
        row["heads_decision_nesting_int8_us"] = row["single_int8_heads"] - row["backbone"]
        row["runtime_python_us"] = row["runtime_int8_heads"] - row["single_int8_heads"]
        row["blocked_handoff_int8_us"] = row["single_int8_heads"] - row["single_int8_heads_reordered"]
        per_exit.append({"exit": k, **row})
    exits = rt.predict(x).exit_index
    record = {
        "benchmark": "runtime_breakdown", "run": str(args.run), "bundle": str(args.bundle),
        "arch": m.model.arch, "dataset": m.dataset.name, "threads": args.threads, "samples": len(x),
        "repeats": args.repeats, "per_exit_us": per_exit,
        "nesting": {"full_depth_graph_us": med["full_depth_graph"],
                    "nested_if_backbone_us": med[f"backbone/{k_exits - 1}"], "if_levels": k_exits - 1,
                    "cost_us": med[f"backbone/{k_exits - 1}"] - med["full_depth_graph"]},
        "nesting_split": split,
        "at_natural_exits": at_natural_exits(times, exits, kinds, np.asarray(rt.exit_costs, dtype=np.float64),
                                             float(m.exits[-1].cumulative_flops)),
        **host.fields(),
        "provenance": provenance(seed=args.seed),
    }
    out = args.out or Path(__file__).parent / "results" / f"runtime_breakdown_{m.dataset.name}_{m.model.arch}.json"
    atomic_write_json(out, record)
    print(f"{'exit':>4} {'backbone':>9} {'float32':>8} {'int8':>8} {'runtime':>8} | "
          f"{'+f32':>6} {'+int8':>6} {'python':>6} {'handoff':>7}")
    for r in per_exit:
        print(f"{r['exit']:>4} {r['backbone']:9.0f} {r['single_float32']:8.0f} {r['single_int8_heads']:8.0f} "
              f"{r['runtime_int8_heads']:8.0f} | {r['heads_decision_nesting_float32_us']:6.0f} "
              f"{r['heads_decision_nesting_int8_us']:6.0f} {r['runtime_python_us']:6.0f} "
              f"{r['blocked_handoff_int8_us']:7.0f}")
    print(json.dumps(record["nesting"]))
    if split:
        print("nesting split (µs, last exit's path, median over rounds): "
              + ", ".join(f"{k} {v:.0f}" for k, v in split["median_us"].items()))
    print(json.dumps(record["at_natural_exits"]["realised_over_predicted"]))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
