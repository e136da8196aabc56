"""GPU verification of every runtime backend against ONNX Runtime CPU, in under 10 minutes on a lent GPU box.

Builds a tiny and a medium 3-exit conv bundle (legacy exporter, seeded), picks a threshold that splits
the batch across exits, and for each GPU backend that can be loaded here checks and records:

* agreement with ONNX Runtime CPU: exit index (goal >= 0.99 of samples) and max |Δprob| (goal <= 1e-3,
  TF32 off), chain with compaction, ``full_depth``, a batch above ``max_batch``, a call from a worker
  thread (as the server's pool does), and ``device`` other than 0 when the box has two GPUs;
* per-exit batch-1 latency (``force_exit=k``, exits interleaved, median) — it should grow with depth;
* that ``latency_ns`` is measured at completion (GPU idle when ``predict`` returns);
* first-call cost of each new batch size after ``warmup`` (goal: no spike > 2x the median of repeats),
  for ONNX Runtime CUDA with HEURISTIC and EXHAUSTIVE cuDNN search;
* CUDA graphs (torch): graph count stays bounded (stages x buckets), and memory does not grow with
  new batch sizes;
* TF32 on vs off (torch, ORT CUDA): the logit drift it causes;
* TensorRT (when importable): FP32 and FP16 engines built with ``build_engines``, FP16 served with
  ``fp16=True``, an FP16-only bundle refused without it (one line, no AttributeError on TensorRT 11).

Run from the repository root (needs torch and onnx for the export; GPU sections skip, with the reason,
when their package or device is missing)::

    timeout 580 python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu          # dry run of the script's own logic on a CPU box

Writes one JSON (checks with PASS/FAIL/SKIP and details, per-exit latencies per backend, versions) and
exits with the number of failed checks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.export.tiny` builds the tiny model
    sys.path.insert(0, str(ROOT))

CHECKS: list[dict[str, Any]] = []
LATENCY: dict[str, dict[str, list[float]]] = {}


def check(name: str, ok: bool | None, detail: str = "", **data: Any) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    CHECKS.append({"status": status, "name": name, "detail": detail, **data})
    print(f"[{status}] {name}: {detail}", flush=True)


def guarded(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Report a section's exception as one FAIL instead of aborting the whole script."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        def run(*a: Any, **k: Any) -> None:
            try:
                fn(*a, **k)
            except Exception as exc:
                check(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                traceback.print_exc(limit=4)

        return run

    return deco


def build_bundles(root: Path) -> list[tuple[Path, np.ndarray]]:
    """A medium conv net (3x32x32, 64-256 channels: GPU time visible) and the tests' tiny one, each 3 exits."""
    import torch
    from torch import nn

    from mexit.export import export_bundle
    from mexit.train.multiexit import MultiExitNet
    from tests.export import tiny

    torch.manual_seed(0)

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU())

    stages = [block(3, 64, 1), block(64, 128, 2), block(128, 256, 2)]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)) for c in (64, 128, 256)]
    with torch.no_grad():
        for h, f in zip(heads, (30.0, 300.0, 30.0), strict=True):
            h[-1].weight.mul_(f)
    net = MultiExitNet(stages, heads, arch="check-conv", input_shape=(3, 32, 32), num_classes=10).eval()
    xm = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    med = export_bundle(net, root / "medium", sample_inputs=xm, threshold=0.8, dataset_name="chk",
                        dataset_kind="image", exporter="legacy", save_torch_programs=True, tolerance=1e-3)
    small = export_bundle(tiny.tiny_conv(), root / "tiny", sample_inputs=tiny.conv_inputs(16, seed=5),
                          threshold=0.8, dataset_name="toy", dataset_kind="image", exporter="legacy",
                          save_torch_programs=True)
    return [(Path(small), tiny.conv_inputs(64, seed=31)),
            (Path(med), np.random.default_rng(3).random((64, 3, 32, 32), dtype=np.float32))]


def compare(name: str, ref: Any, got: Any, atol: float = 1e-3) -> None:
    agree = float(np.mean(ref.exit_index == got.exit_index))
    diff = float(np.abs(ref.probs - got.probs).max())
    check(name, agree >= 0.99 and diff <= atol, f"exit agreement {agree:.3f}, max|dprob| {diff:.2e} (atol {atol})",
          exit_agreement=agree, max_abs_dprob=diff)


def per_exit_latency(label: str, rt: Any, x1: np.ndarray, rounds: int = 200) -> None:
    """Median batch-1 latency per forced exit, exits interleaved in random order; check it grows with depth."""
    rng = np.random.default_rng(0)
    samples: dict[int, list[int]] = {k: [] for k in range(rt.num_exits)}
    for _ in range(rounds):
        for k in rng.permutation(rt.num_exits):
            samples[int(k)].append(int(rt.predict(x1, force_exit=int(k)).latency_ns[0]))
    med = [statistics.median(samples[k]) / 1e3 for k in range(rt.num_exits)]
    LATENCY.setdefault(label, {})["median_us"] = med
    LATENCY[label]["p90_us"] = [float(np.percentile(samples[k], 90)) / 1e3 for k in range(rt.num_exits)]
    check(f"{label}: per-exit latency grows with depth", all(a < b for a, b in itertools.pairwise(med)),
          "medians " + ", ".join(f"{m:.0f}" for m in med) + " us")


def first_call_spikes(label: str, rt: Any, x: np.ndarray) -> None:
    """After warmup at batch 1, the first call at each new batch size vs the median of repeats at that size."""
    sizes = (3, 5, 9, 17, 33)
    first = [int(rt.predict(x[:n]).latency_ns.max()) for n in sizes]
    again = [statistics.median(int(rt.predict(x[:n]).latency_ns.max()) for _ in range(5)) for n in sizes]
    worst = max(f / a for f, a in zip(first, again, strict=True))
    check(f"{label}: first call per new batch size <= 2x median", worst <= 2.0,
          f"worst ratio {worst:.2f}; first {[round(f / 1e3) for f in first]} us, "
          f"median {[round(a / 1e3) for a in again]} us", worst_ratio=worst)


def gpu_idle_after_predict(label: str, rt: Any, x: np.ndarray, sync: Callable[[], None]) -> None:
    big = np.repeat(x, 4, axis=0)
    pending = []
    for _ in range(3):
        p = rt.predict(big, force_exit=rt.num_exits - 1)
        t = time.perf_counter_ns()
        sync()
        pending.append((time.perf_counter_ns() - t, int(p.latency_ns.max())))
    waited, lat = max(pending)
    check(f"{label}: latency_ns measured at completion", waited < 0.05 * lat,
          f"sync after predict {waited / 1e3:.0f} us vs latency {lat / 1e3:.0f} us")


def from_thread(rt: Any, x: np.ndarray) -> Any:
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.setdefault("p", rt.predict(x)), name="pool-worker")
    th.start()
    th.join()
    return out["p"]


@guarded("torch backend")
def torch_section(bundle: Path, x: np.ndarray, tau: float, ref: Any, device: str) -> None:
    import torch

    from mexit.runtime import EarlyExitRuntime

    tag = f"torch[{device}] {bundle.name}"
    rt = EarlyExitRuntime(bundle, backend="torch", device=device, threshold=tau)
    compare(f"{tag} chain vs ORT-CPU", ref, rt.predict(x))
    compare(f"{tag} full_depth", EarlyExitRuntime(bundle).predict(x, full_depth=True), rt.predict(x, full_depth=True))
    compare(f"{tag} predict from a worker thread", ref, from_thread(rt, x))
    if device == "cpu":
        return
    rt.warmup(3)
    per_exit_latency(tag, rt, x[:1])
    gpu_idle_after_predict(tag, rt, x, torch.cuda.synchronize)
    first_call_spikes(tag, rt, x)
    tf32 = EarlyExitRuntime(bundle, backend="torch", device=device, threshold=tau, tf32=True).predict(x)
    check(f"{tag} TF32 on: drift (informative)", None,
          f"exit agreement {np.mean(tf32.exit_index == ref.exit_index):.3f}, "
          f"max|dprob| {np.abs(tf32.probs - ref.probs).max():.2e}")
    EarlyExitRuntime(bundle, backend="torch", device=device, tf32=False)  # restore the process-wide setting
    torch.cuda.synchronize()
    m0 = torch.cuda.memory_reserved()
    g = EarlyExitRuntime(bundle, backend="torch", device=device, threshold=tau, cuda_graphs=True,
                         cuda_graph_max_batch=64)
    compare(f"{tag} cuda_graphs chain", ref, g.predict(x))
    compare(f"{tag} cuda_graphs from a worker thread", ref, from_thread(g, x))
    count, m1 = g.backend.graph_count, torch.cuda.memory_reserved()
    for n in range(1, 65):
        g.predict(x[:n])
    grew = (torch.cuda.memory_reserved() - m1) / 2**20
    check(f"{tag} cuda_graphs bounded", g.backend.graph_count == count and grew < 64,
          f"{count} graphs captured at load (+{(m1 - m0) / 2**20:.0f} MiB); after batches 1..64: "
          f"{g.backend.graph_count} graphs, +{grew:.0f} MiB")
    per_exit_latency(f"{tag} cuda_graphs", g, x[:1])
    if torch.cuda.device_count() > 1:
        r1 = EarlyExitRuntime(bundle, backend="torch", device=1, threshold=tau)
        compare(f"{tag} device=1 from a worker thread", ref, from_thread(r1, x))


@guarded("onnxruntime-gpu backend")
def ort_gpu_section(bundle: Path, x: np.ndarray, tau: float, ref: Any) -> None:
    import onnxruntime as ort

    from mexit.runtime import EarlyExitRuntime

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        check("ORT CUDA EP", None, f"providers {ort.get_available_providers()} (CPU-only onnxruntime)")
        return
    for search in ("HEURISTIC", "EXHAUSTIVE"):
        tag = f"ORT CUDA ({search}) {bundle.name}"
        rt = EarlyExitRuntime(bundle, backend="onnxruntime-gpu", threshold=tau, cudnn_conv_algo_search=search)
        compare(f"{tag} chain incl. Gather compaction", ref, rt.predict(x))
        compare(f"{tag} from a worker thread", ref, from_thread(rt, x))
        rt.warmup(3)
        first_call_spikes(tag, rt, x)
        if search == "HEURISTIC":
            per_exit_latency(tag, rt, x[:1])
    tf32 = EarlyExitRuntime(bundle, backend="onnxruntime-gpu", threshold=tau, tf32=True).predict(x)
    check(f"ORT CUDA {bundle.name} TF32 on: drift (informative)", None,
          f"exit agreement {np.mean(tf32.exit_index == ref.exit_index):.3f}, "
          f"max|dprob| {np.abs(tf32.probs - ref.probs).max():.2e}")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        rt = EarlyExitRuntime(bundle, backend="onnxruntime-gpu", provider="tensorrt", threshold=tau, max_batch=64)
        compare(f"ORT TRT EP {bundle.name} chain", ref, rt.predict(x))


@guarded("TensorRT backend")
def trt_section(bundle: Path, x: np.ndarray, tau: float, ref: Any, work: Path) -> None:
    from mexit.errors import BackendUnavailableError
    from mexit.runtime import EarlyExitRuntime

    try:
        from mexit.export.tensorrt import build_engines, check_build_support, fp16_mode

        trt = check_build_support(fp16=False)
    except BackendUnavailableError as exc:
        check("TensorRT", None, str(exc)[:200])
        return
    from mexit.runtime.tensorrt_backend import import_cudart

    cudart = import_cudart()
    check("TensorRT versions", None, f"trt {trt.__version__} (fp16 via {fp16_mode(trt)}), "
          f"cudart {cudart.cudaRuntimeGetVersion()[1]}, driver {cudart.cudaDriverGetVersion()[1]}")
    b32 = work / "trt32"
    shutil.copytree(bundle, b32)
    t = time.time()
    build_engines(b32, max_batch=32)
    check(f"TRT {bundle.name} build fp32 engines", True, f"{time.time() - t:.1f}s")
    rt = EarlyExitRuntime(b32, backend="tensorrt", threshold=tau)
    compare(f"TRT {bundle.name} chain vs ORT-CPU (device-side compaction)", ref, rt.predict(x))
    compare(f"TRT {bundle.name} full_depth", EarlyExitRuntime(bundle).predict(x, full_depth=True),
            rt.predict(x, full_depth=True))
    compare(f"TRT {bundle.name} batch 64 > max_batch 32 (split)", ref, rt.predict(x))
    compare(f"TRT {bundle.name} predict from a worker thread", ref, from_thread(rt, x))
    rt.warmup(3)
    per_exit_latency(f"TRT fp32 {bundle.name}", rt, x[:1])
    first_call_spikes(f"TRT fp32 {bundle.name}", rt, x)
    b16 = work / "trt16"
    shutil.copytree(bundle, b16)
    try:
        build_engines(b16, fp16=True, max_batch=32)
        check(f"TRT {bundle.name} build fp16 engines", True, fp16_mode(trt))
    except BackendUnavailableError as exc:
        check(f"TRT {bundle.name} build fp16 engines", None, str(exc)[:200])
        return
    try:
        EarlyExitRuntime(b16, backend="tensorrt")
        check("fp16-only bundle refused without fp16", False, "loaded FP16 engines although FP32 was asked")
    except BackendUnavailableError as exc:
        check("fp16-only bundle refused without fp16", "only FP16" in str(exc), str(exc)[:160])
    r16 = EarlyExitRuntime(b16, backend="tensorrt", fp16=True, threshold=tau)
    p16 = r16.predict(x)
    check(f"TRT fp16 {bundle.name} agreement (informative: recalibrate tau for FP16)", None,
          f"{np.mean(p16.exit_index == ref.exit_index):.3f}, max|dprob| {np.abs(p16.probs - ref.probs).max():.2e}")
    per_exit_latency(f"TRT fp16 {bundle.name}", r16, x[:1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="torch device for the torch section (cpu: dry run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary bundles")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from mexit._io import atomic_write_json, provenance
    from mexit.runtime import EarlyExitRuntime
    from tests.export import tiny

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    print(json.dumps(info), flush=True)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="mexit-gpu-"))
    try:
        for bundle, x in build_bundles(work):
            cpu = EarlyExitRuntime(bundle)
            tau = tiny.mid_threshold(cpu.predict(x, force_exit=0).probs.max(axis=1), 0.4)
            ref = EarlyExitRuntime(bundle, threshold=tau).predict(x)
            print(f"--- {bundle.name}: tau {tau:.4f}, exits {np.bincount(ref.exit_index, minlength=3)}", flush=True)
            per_exit_latency(f"ORT CPU {bundle.name}", EarlyExitRuntime(bundle, threshold=tau), x[:1], rounds=100)
            torch_section(bundle, x, tau, ref, args.device)
            if args.device != "cpu":
                ort_gpu_section(bundle, x, tau, ref)
                trt_section(bundle, x, tau, ref, work / bundle.name)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    fails = sum(c["status"] == "FAIL" for c in CHECKS)
    record = {"benchmark": "gpu_check", "environment": info, "seconds": time.time() - t0, "checks": CHECKS,
              "per_exit_latency_batch1": LATENCY, "failed": fails, "provenance": provenance(seed=0)}
    atomic_write_json(args.out, record)
    print(f"{sum(c['status'] == 'PASS' for c in CHECKS)} passed, {fails} failed  ->  {args.out}")
    return fails


if __name__ == "__main__":
    sys.exit(main())
