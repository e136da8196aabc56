"""What the host could do while a benchmark ran: its CPU, and two tiny ONNX Runtime probes timed before and after.

Why: the deployment-speed benchmarks are run on a shared 2-vCPU VM whose hardware and neighbours change between
sessions. Load averages alone did not show it: on two hosts with the same load one FCN-18-1 stage cost 19.5 µs a row
at 64 rows and 245 µs at 1 row, on the other 47 µs and 111 µs (``stage_cost_by_rows``, issue 14, sessions 12 and 14)
— fast compute with slow weight streaming on one, the other way round on the other, with opposite consequences for
early exit's batch-64 gain. The probes time the two regimes the bundles' stages live in, with the benchmarks' own
engine and settings (ONNX Runtime CPU, one thread, no spinning):

- ``gemm_gflops``: ``MatMul`` of 64 rows by a 1024 × 1024 float32 weight (4 MiB, cache-resident after the first
  call) — the compute a batch's stage gets;
- ``gemv_gbytes_s``: one row by a 4096 × 4096 weight (64 MiB, larger than the last-level cache) — the bandwidth a
  batch-1 stage that streams its weights gets.

Each is the median of its calls; building and timing both takes 1-3 s. Not a package module: the benchmarks import
it as a sibling script (as ``_common`` and ``runtime_latency``).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

#: ``/proc/cpuinfo`` flags worth recording: they decide which kernels ONNX Runtime's MLAS picks.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
GEMM_ROWS, GEMM_SIZE, GEMM_CALLS = 64, 1024, 15
GEMV_SIZE, GEMV_CALLS = 4096, 9


def cpu_description() -> dict[str, Any]:
    """Model name, the kernel-relevant flags, cache sizes and whether a hypervisor is reported (Linux; else partial)."""
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(model=fields.get("model name"), mhz=float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
                flags=[f for f in FLAGS if f in flags], hypervisor="hypervisor" in flags)
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = (
                (index / "size").read_text().strip())
        except OSError:
            continue
    info["caches_per_cpu0"] = caches
    return info


@cache  # built once a process: the probe after the run times the same sessions as the one before
def _session(rows: int, size: int, seed: int) -> tuple[Any, dict[str, np.ndarray]]:
    """An ONNX Runtime session of ``Y = X @ W`` (``W`` a ``size`` × ``size`` initializer) and its feed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, size])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, {"x": rng.standard_normal((rows, size), dtype=np.float32)}


def _median_s(sess: Any, feed: dict[str, np.ndarray], calls: int) -> float:
    sess.run(None, feed)  # first call: allocations, and the weight into the caches where it fits
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe() -> dict[str, float]:
    """``gemm_gflops`` and ``gemv_gbytes_s`` (see the module docstring); empty when ``onnx`` is not installed."""
    try:
        gemm, gemm_feed = _session(GEMM_ROWS, GEMM_SIZE, 0)
        gemv, gemv_feed = _session(1, GEMV_SIZE, 1)
    except ImportError:
        return {}
    gemm_s = _median_s(gemm, gemm_feed, GEMM_CALLS)
    gemv_s = _median_s(gemv, gemv_feed, GEMV_CALLS)
    return {"gemm_gflops": round(2 * GEMM_ROWS * GEMM_SIZE**2 / gemm_s / 1e9, 1),
            "gemv_gbytes_s": round(4 * GEMV_SIZE**2 / gemv_s / 1e9, 1)}


@dataclass
class HostRun:
    """The host around one benchmark run: :meth:`begin` before the measurements, :meth:`load_record` and
    :meth:`host_record` after them (each probes again, so a host that changed under the run shows)."""

    load_before: tuple[float, float, float]
    probe_before: dict[str, float]
    _after: dict[str, float] | None = field(default=None, repr=False)

    @classmethod
    def begin(cls) -> HostRun:
        return cls(os.getloadavg(), probe())

    def load_record(self) -> dict[str, Any]:
        """``{"before", "after", "cpus"}``: the load averages, as every deployment-speed JSON has recorded them."""
        return {"before": list(self.load_before), "after": list(os.getloadavg()), "cpus": os.cpu_count()}

    def host_record(self) -> dict[str, Any]:
        """The CPU and the probes before and after the run."""
        if self._after is None:
            self._after = probe()
        return {**cpu_description(), "probe_before": self.probe_before, "probe_after": self._after}

    def fields(self) -> dict[str, Any]:
        """The two entries every deployment-speed JSON carries: ``load_average_1_5_15`` and ``host``."""
        return {"load_average_1_5_15": self.load_record(), "host": self.host_record()}
