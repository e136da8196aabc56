"""OpenVINO CPU against ONNX Runtime CPU on a bundle: would an OpenVINO backend beat the default one? (issue 14)

Both run the bundle's own ONNX files, one thread, float32 (OpenVINO's ``INFERENCE_PRECISION_HINT=f32``: on CPUs
with AMX it would otherwise run in bf16 and move exits), on the run's test samples:

* batch 1, blocked (every sample through one configuration, then the next; median of the repeats), natural exits:
  the full-depth graph on each runtime; mexit's runtime (ONNX Runtime, the single ``If`` graph); OpenVINO on the
  same single ``If`` graph; OpenVINO on the per-stage chain with the exit decision in numpy;
* batch 64: the full-depth graph on each, mexit's runtime, and the OpenVINO per-stage chain with per-sample exits
  (survivors compacted between stages, as mexit's runtime does);
* the exits OpenVINO's chain takes, against mexit's runtime.

An OpenVINO backend is worth adding only if it beats mexit's runtime at the same job (the early exit, batch 1 and
64); beating ONNX Runtime on the full graph alone is not enough. Needs ``pip install openvino``.

    python benchmarks/openvino_vs_ort.py --run RUN_DIR --bundle BUNDLE [--threshold T] [--out …]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from host_probe import HostRun  # a sibling script
from runtime_latency import (  # a sibling script, importable once its folder is on sys.path
    add_test_split_options,
    blocked_per_sample,
    held_out,
)

from mexit._io import atomic_write_json, provenance
from mexit.bundle import load_bundle
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.backends import early_exit_graph, session_options

#: One thread, latency mode, float32 (see the module docstring).
OV_CONFIG = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
             "NUM_STREAMS": 1}


class OpenVinoChain:
    """The bundle's stages compiled by OpenVINO, chained with per-sample exits (max-probability policy)."""

    def __init__(self, core: object, bundle_dir: Path, threshold: float) -> None:
        self.manifest = load_bundle(bundle_dir).manifest
        b = load_bundle(bundle_dir)
        self.stages = [core.compile_model(str(b.file(e.stage_file)), "CPU", OV_CONFIG)  # type: ignore[attr-defined]
                       for e in self.manifest.exits]
        self.requests = [s.create_infer_request() for s in self.stages]
        self.threshold = threshold

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Exit index per row of ``x``."""
        exits = np.full(len(x), len(self.stages) - 1, dtype=np.int64)
        rows, h = np.arange(len(x)), x
        for k, (stage, request) in enumerate(zip(self.stages, self.requests, strict=True)):
            e = self.manifest.exits[k]
            request.infer({0: h})
            if e.feature_output is None:
                break
            logits = request.get_tensor(stage.output(e.logits_output)).data
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            done = (z.max(axis=1) / z.sum(axis=1)) >= self.threshold
            exits[rows[done]] = k
            if done.all():
                break
            keep = np.flatnonzero(~done)
            rows, h = rows[keep], np.take(request.get_tensor(stage.output(e.feature_output)).data, keep, axis=0)
        return exits


def median_us(fn: Callable[[], object], rounds: int = 10) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_split_options(parser, samples=300, repeats=3)
    args = parser.parse_args()
    try:
        import openvino as ov
    except ImportError:
        parser.error("this benchmark needs OpenVINO: pip install openvino")
    host = HostRun.begin()
    x, _ = held_out(args)
    b = load_bundle(args.bundle)
    m = b.manifest
    rt = EarlyExitRuntime(args.bundle, threshold=args.threshold)
    tau = rt.threshold
    core = ov.Core()
    chain = OpenVinoChain(core, args.bundle, tau)
    ov_full = core.compile_model(str(b.full_path), "CPU", OV_CONFIG).create_infer_request()
    ov_single = core.compile_model(core.read_model(early_exit_graph(b), b""), "CPU", OV_CONFIG).create_infer_request()
    taus = {f"mexit_tau{j}": np.array(tau, np.float32) for j in range(m.model.num_exits - 1)}
    x_single = f"s0_{m.exits[0].input_name}"
    ort_full = ort.InferenceSession(str(b.full_path), session_options(), providers=["CPUExecutionProvider"])
    ort_in = ort_full.get_inputs()[0].name
    batch1 = {name: float(np.median(t, axis=0).mean()) / 1e3 for name, t in blocked_per_sample({
        "onnxruntime_full_graph": lambda xi: ort_full.run(None, {ort_in: xi}),
        "openvino_full_graph": lambda xi: ov_full.infer({0: xi}),
        "mexit_runtime_onnxruntime": lambda xi: rt.predict(xi),
        "openvino_single_if_graph": lambda xi: ov_single.infer({x_single: xi, **taus}),
        "openvino_stage_chain": chain,
    }, x, args.repeats, np.random.default_rng(args.seed)).items()}
    xb = x[:64]
    batch64 = {"onnxruntime_full_graph": median_us(lambda: ort_full.run(None, {ort_in: xb})),
               "openvino_full_graph": median_us(lambda: ov_full.infer({0: xb})),
               "mexit_runtime_onnxruntime": median_us(lambda: rt.predict(xb)),
               "openvino_stage_chain": median_us(lambda: chain(xb))}
    ours = rt.predict(x).exit_index
    record = {
        "benchmark": "openvino_vs_ort", "run": str(args.run), "bundle": str(args.bundle), "arch": m.model.arch,
        "dataset": m.dataset.name, "threshold": tau, "samples": len(x), "openvino_config": OV_CONFIG,
        "versions": {"openvino": importlib.metadata.version("openvino"), "onnxruntime": ort.__version__},
        "batch1_us_per_sample": batch1, "batch64_us_per_batch": batch64,
        "exit_agreement_openvino_chain": float(np.mean(chain(x) == ours)),
        "openvino_beats_mexit_runtime": {
            "batch1": batch1["openvino_single_if_graph"] < batch1["mexit_runtime_onnxruntime"]
            or batch1["openvino_stage_chain"] < batch1["mexit_runtime_onnxruntime"],
            "batch64": batch64["openvino_stage_chain"] < batch64["mexit_runtime_onnxruntime"]},
        **host.fields(),
        "provenance": provenance(seed=args.seed),
    }
    out = args.out or Path(__file__).parent / "results" / f"openvino_vs_ort_{m.dataset.name}_{m.model.arch}.json"
    atomic_write_json(out, record)
    print(json.dumps({k: record[k] for k in ("batch1_us_per_sample", "batch64_us_per_batch",
                                             "exit_agreement_openvino_chain", "openvino_beats_mexit_runtime")},
                     indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
