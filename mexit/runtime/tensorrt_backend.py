"""TensorRT backend: the bundle's prebuilt engines (``engines/<gpu>_trt<version>[_fp16]/stage_k.plan``), chained
on the device; and the one copy of the TensorRT / cuda-python import-and-check helpers (the engine
builder, :mod:`mexit.export.tensorrt`, imports them from here).

Each stage's feature output is written to a device buffer that the next stage reads directly (its
input tensor address is that buffer), so activations never leave the GPU; only the logits are copied
to the host for the exit decision. Compaction gathers the surviving rows device-to-device into a
second buffer: with a one-kernel row gather (compiled at load with NVRTC, :class:`GatherKernel`) when
the survivors are scattered over more than ``GATHER_MIN_RUNS`` runs, else with one ``cudaMemcpyAsync``
per run of consecutive rows (rows are contiguous in the batch-major layout; no kernel launch and no
index upload, cheaper for the usual few runs). Without NVRTC (``gather_kernel=False``, or its library
missing) every compaction uses the copies. Buffers are allocated once for the engines' ``max_batch``; the runtime splits
larger batches. Execution contexts and buffers are shared, so calls are serialised
(``thread_safe = False``); they may come from any thread (the server predicts from a pool), so the
CUDA device, which is per host thread, is made current on each thread before its first call.

Engines only run on the GPU model and TensorRT version that built them: the backend picks the engine
set recorded in the manifest for this GPU, this TensorRT version and the asked precision (``fp16``),
and otherwise says what the bundle has and the command that builds what is missing.

``tensorrt`` and ``cuda-python`` are imported when the backend is constructed, never at module import.
``threads`` is accepted for a uniform interface and ignored: all work runs on the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from mexit.bundle import Bundle, engine_dir_name, load_bundle
from mexit.errors import BackendUnavailableError, BundleError, InputError
from mexit.runtime.registry import gpu_index, register_backend

log = logging.getLogger(__name__)

TENSORRT_HINT = (
    'install TensorRT 10 and a cuda-python of the same CUDA major (`pip install mexit[tensorrt]` for CUDA 12; on '
    "Jetson use JetPack's TensorRT, see README \"GPU and edge deployment\"); it needs an NVIDIA GPU"
)
MIN_TENSORRT = 10


def import_tensorrt() -> Any:
    """``import tensorrt`` (version 10 or newer), or :class:`BackendUnavailableError` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not importable ({exc}); {TENSORRT_HINT}") from exc
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {version} is too old (need {MIN_TENSORRT} or newer); {TENSORRT_HINT}"
        )
    return trt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (``cuda.bindings.runtime`` from 12.6 on, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as exc:
            raise BackendUnavailableError(f"cuda-python is not importable ({exc}); {TENSORRT_HINT}") from exc
    return cudart


def cuda_check(result: Any, cudart: Any | None = None) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` tuple: the value(s), or ``RuntimeError`` naming the CUDA error."""
    cudart = cudart if cudart is not None else import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name(device_id: int = 0, cudart: Any | None = None) -> str:
    """The CUDA device's marketing name (e.g. "NVIDIA H200"), part of the engine directory key.

    A machine without a usable GPU (no device, no driver) is :class:`BackendUnavailableError`.
    """
    cudart = cudart if cudart is not None else import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != int(cudart.cudaError_t.cudaSuccess) or int(count) == 0:
        raise BackendUnavailableError(f"no CUDA GPU is usable here (cudaGetDeviceCount: {err}); {TENSORRT_HINT}")
    if not 0 <= device_id < int(count):
        raise BackendUnavailableError(f"there is no GPU {device_id} here (this machine has {int(count)}); "
                                      f"pick device 0..{int(count) - 1}")
    props = cuda_check(cudart.cudaGetDeviceProperties(device_id), cudart)
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).split("\x00")[0].strip()


def _describe(info: Mapping[str, Any], key: str) -> str:
    precision = "FP16" if info.get("fp16", key.endswith("_fp16")) else "FP32"
    return f"{precision} for {info.get('gpu', '?')} / TensorRT {info.get('tensorrt', '?')}"


def select_engines(
    engines: Mapping[str, Mapping[str, Any]],
    *,
    gpu: str,
    trt_version: str,
    fp16: bool,
    bundle_path: str,
    engine_key: str | None = None,
) -> tuple[str, Mapping[str, Any]]:
    """The manifest's engine set for this GPU, TensorRT version and precision, or one line saying what is
    there and the command that builds what is missing (:class:`BackendUnavailableError`)."""
    build = f"`mexit export {bundle_path} --engines-only --engine tensorrt{' --fp16' if fp16 else ''}`"
    key = engine_key or engine_dir_name(gpu, trt_version, fp16=fp16)
    info = engines.get(key)
    if info is not None:
        return key, info
    if engine_key:
        have = ", ".join(sorted(engines)) or "none"
        raise BackendUnavailableError(f"bundle {bundle_path} has no TensorRT engine set {engine_key!r} "
                                      f"(it has: {have})")
    here = f"{gpu} / TensorRT {trt_version}"
    if not engines:
        raise BackendUnavailableError(f"bundle {bundle_path} has no TensorRT engines; build them on this machine "
                                      f"({here}) with {build}")
    other = engines.get(engine_dir_name(gpu, trt_version, fp16=not fp16))
    if other is not None:
        asked, got = ("FP16", "FP32") if fp16 else ("FP32", "FP16")
        switch = "without --fp16 (fp16=False)" if fp16 else "with --fp16 (fp16=True)"
        raise BackendUnavailableError(
            f"bundle {bundle_path} has only {got} TensorRT engines for {here}, {asked} asked; serve them {switch}, "
            f"or build {asked} ones here with {build}"
        )
    have = "; ".join(_describe(v, k) for k, v in sorted(engines.items()))
    raise BackendUnavailableError(
        f"bundle {bundle_path} has TensorRT engines for {have} but none for {here} "
        f"({'FP16' if fp16 else 'FP32'}); engines run only on the GPU model and TensorRT version that built them: "
        f"build them here with {build}"
    )


#: Scattered survivors above this many runs of consecutive rows are gathered by the kernel.
GATHER_MIN_RUNS = 4

_GATHER_SRC = b"""
extern "C" __global__ void gather_rows(const float* __restrict__ src, float* __restrict__ dst,
                                       const long long* __restrict__ idx, long long n_rows, long long row_elems) {
    long long total = n_rows * row_elems;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / row_elems;
        dst[i] = src[idx[r] * row_elems + (i - r * row_elems)];
    }
}
"""


def _import_nvrtc_driver() -> tuple[Any, Any]:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]  # cuda-python < 12.6 layout
        from cuda import nvrtc  # type: ignore[no-redef]
    return nvrtc, driver


class GatherKernel:
    """``dst[j] = src[idx[j]]`` over rows of ``row_elems`` float32, as one CUDA kernel launch.

    Compiled from :data:`_GATHER_SRC` with NVRTC to PTX for this GPU's compute capability and loaded
    with the driver API into the primary context the runtime API uses. :meth:`build` returns None
    (and the backend falls back to per-run copies) when NVRTC or its library is unavailable.
    """

    THREADS = 256

    def __init__(self, nvrtc: Any, driver: Any, major: int, minor: int) -> None:
        self._nvrtc, self._driver = nvrtc, driver
        err, prog = nvrtc.nvrtcCreateProgram(_GATHER_SRC, b"mexit_gather.cu", 0, [], [])
        self._ok(err, "nvrtcCreateProgram")
        opts = [f"--gpu-architecture=compute_{major}{minor}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        self._ok(err, "nvrtcCompileProgram")
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        self._ok(err, "nvrtcGetPTXSize")
        ptx = b" " * int(size)
        (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
        self._ok(err, "nvrtcGetPTX")
        self._ptx = np.frombuffer(ptx, dtype=np.uint8).copy()  # kept alive while the module loads
        err, self._module = driver.cuModuleLoadData(self._ptx.ctypes.data)
        self._ok(err, "cuModuleLoadData")
        err, self._fn = driver.cuModuleGetFunction(self._module, b"gather_rows")
        self._ok(err, "cuModuleGetFunction")
        self.launches = 0

    @staticmethod
    def _ok(err: Any, what: str) -> None:
        if int(err) != 0:
            raise RuntimeError(f"{what} failed ({err})")

    @classmethod
    def build(cls, cudart: Any, device_id: int) -> GatherKernel | None:
        """The compiled kernel for GPU ``device_id``, or None (logged) when it cannot be built here."""
        try:
            nvrtc, driver = _import_nvrtc_driver()
            props = cuda_check(cudart.cudaGetDeviceProperties(device_id), cudart)
            return cls(nvrtc, driver, int(props.major), int(props.minor))
        except Exception as exc:  # optional speed-up: per-run copies are always correct
            log.info("no NVRTC gather kernel (%s); compaction uses one device copy per run of rows", exc)
            return None

    def launch(self, src: int, dst: int, idx_dev: int, n_rows: int, row_elems: int, stream: Any) -> None:
        """Enqueue the gather of ``n_rows`` rows on ``stream`` (``idx_dev``: int64 row indices on the device)."""
        values = [np.array([v], dtype=np.uint64) for v in (src, dst, idx_dev)]
        values += [np.array([v], dtype=np.int64) for v in (n_rows, row_elems)]
        args = np.array([v.ctypes.data for v in values], dtype=np.uint64)
        total = n_rows * row_elems
        blocks = max(1, min(65535, (total + self.THREADS - 1) // self.THREADS))
        handle = getattr(self._driver, "CUstream", None)
        drv_stream = handle(int(stream)) if handle is not None else stream
        (err,) = self._driver.cuLaunchKernel(self._fn, blocks, 1, 1, self.THREADS, 1, 1, 0, drv_stream,
                                             args.ctypes.data, 0)
        self._ok(err, "cuLaunchKernel")
        self.launches += 1


class _Rows:
    """A device-resident batch of features: ``n`` rows of ``row_bytes`` at ``ptr``."""

    __slots__ = ("n", "ptr", "row_bytes", "stage")

    def __init__(self, ptr: int, n: int, row_bytes: int, stage: int) -> None:
        self.ptr = ptr
        self.n = n
        self.row_bytes = row_bytes
        self.stage = stage


def row_runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """``(first_row, length)`` of each run of consecutive indices in ``idx`` (ascending, unique), in order."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [(int(idx[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


@register_backend("tensorrt", extra="tensorrt",
                  description="prebuilt TensorRT engines from the bundle (mexit export --engine tensorrt), on the GPU")
class TensorRTBackend:
    """Prebuilt TensorRT engines for this GPU and TensorRT version, chained through device buffers."""

    name = "tensorrt"
    thread_safe = False

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """A device that is no GPU index is refused before TensorRT is imported."""
        gpu_index(cls.name, options.get("device"))

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        threads: int = 1,
        device: int | str | None = None,
        fp16: bool = False,
        engine_key: str | None = None,
        gather_kernel: bool = True,
    ) -> None:
        if threads != 1:
            log.debug("tensorrt backend: threads=%s ignored (all work runs on the GPU)", threads)
        self.device_id = gpu_index(self.name, device)
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self._allocs: list[int] = []
        self._tls = threading.local()
        self.bundle = load_bundle(bundle)
        m = self.bundle.manifest
        gpu = gpu_name(self.device_id, cudart)
        self._use_device()
        key, info = select_engines(m.engines, gpu=gpu, trt_version=str(trt.__version__), fp16=bool(fp16),
                                   bundle_path=str(self.bundle.path), engine_key=engine_key)
        self.engine_key = key
        if len(info["stages"]) != m.model.num_exits:
            raise BundleError(
                f"TensorRT engine set {key} has {len(info['stages'])} stages for {m.model.num_exits} exits; rebuild it"
            )
        self.max_batch: int | None = int(info["max_batch"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._stream = self._ck(cudart.cudaStreamCreate())
        c = m.model.num_classes
        self._stages: list[dict[str, Any]] = []
        in_row = int(np.prod(m.input.sample_shape)) * 4
        self._input_buf = self._malloc(self.max_batch * in_row)
        for e in m.exits:
            engine = self._deserialize(info["stages"][e.index])
            self._check_float32(engine, e.stage_file)
            feat_shape = None if e.feature_shape is None else tuple(int(d) for d in e.feature_shape)
            if e.feature_output is not None and feat_shape is None:
                raise BundleError(f"manifest.exits[{e.index}].feature_shape is missing; re-export the bundle")
            feat_row = None if feat_shape is None else int(np.prod(feat_shape)) * 4
            self._stages.append({
                "engine": engine,
                "ctx": engine.create_execution_context(),
                "input": e.input_name,
                "feature": e.feature_output,
                "logits": e.logits_output,
                "in_shape": m.input.sample_shape if e.index == 0 else tuple(m.exits[e.index - 1].feature_shape or ()),
                "feat_shape": feat_shape,
                "feat_row": feat_row,
                "feat_buf": self._malloc(self.max_batch * feat_row) if feat_row else 0,
                "compact_buf": self._malloc(self.max_batch * feat_row) if feat_row else 0,
                "logits_buf": self._malloc(self.max_batch * c * 4),
            })
        self._full: dict[str, Any] | None = None
        if info.get("full"):
            engine = self._deserialize(info["full"])
            self._check_float32(engine, "full.onnx")
            out_name = next(
                engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
            )
            self._full = {"engine": engine, "ctx": engine.create_execution_context(), "output": out_name,
                          "logits_buf": self._malloc(self.max_batch * c * 4)}
        self._num_classes = c
        self._in_row = in_row
        self.copies = 0  # device-to-device copies issued by take(), for tests and profiling
        self._gather = GatherKernel.build(cudart, self.device_id) if gather_kernel else None
        self._idx_buf = self._malloc(self.max_batch * 8) if self._gather is not None else 0

    # --- CUDA helpers ----------------------------------------------------------------------------
    def _ck(self, result: Any) -> Any:
        return cuda_check(result, self._cudart)

    def _use_device(self) -> None:
        """Make this backend's GPU current on the calling thread (CUDA's current device is per thread)."""
        if getattr(self._tls, "device", None) != self.device_id:
            self._ck(self._cudart.cudaSetDevice(self.device_id))
            self._tls.device = self.device_id

    def _malloc(self, nbytes: int) -> int:
        ptr = int(self._ck(self._cudart.cudaMalloc(max(1, int(nbytes)))))
        self._allocs.append(ptr)
        return ptr

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        k = getattr(self._cudart.cudaMemcpyKind, kind)
        self._ck(self._cudart.cudaMemcpyAsync(dst, src, int(nbytes), k, self._stream))

    def _sync(self) -> None:
        self._ck(self._cudart.cudaStreamSynchronize(self._stream))

    def _deserialize(self, rel: str) -> Any:
        engine = self._runtime.deserialize_cuda_engine(self.bundle.file(rel).read_bytes())
        if engine is None:
            raise BackendUnavailableError(
                f"TensorRT {self._trt.__version__} could not load {rel} (built for another GPU or TensorRT version?); "
                f"rebuild with `mexit export {self.bundle.path} --engines-only --engine tensorrt --overwrite`"
            )
        return engine

    def _check_float32(self, engine: Any, what: str) -> None:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_dtype(name) != self._trt.float32:
                raise BundleError(f"engine for {what}: tensor {name} is not float32 (FP16 engines keep FP32 I/O); "
                                  "rebuild the engines with mexit export --engines-only")

    # --- Backend protocol ------------------------------------------------------------------------
    def _run(self, ctx: Any, in_name: str, in_ptr: int, shape: tuple[int, ...],
             outputs: Mapping[str, tuple[int, tuple[int, ...]]]) -> None:
        """Set shapes and addresses and enqueue; every output's shape is checked against its buffer first."""
        if not ctx.set_input_shape(in_name, shape):
            raise InputError(f"TensorRT rejected input shape {shape} for {in_name} (engine max batch {self.max_batch})")
        ctx.set_tensor_address(in_name, in_ptr)
        for name, (ptr, want) in outputs.items():
            got = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if got != want:
                raise BundleError(f"TensorRT output {name} has shape {got}, the manifest says {want}; rebuild the "
                                  "engines from this bundle (mexit export --engines-only --overwrite)")
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _upload(self, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._memcpy(self._input_buf, x.ctypes.data, x.nbytes, "cudaMemcpyHostToDevice")
        return self._input_buf

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        self._use_device()
        st = self._stages[k]
        if isinstance(inputs, np.ndarray):
            n, in_ptr = inputs.shape[0], self._upload(inputs)
        else:
            n, in_ptr = inputs.n, inputs.ptr
        outputs = {st["logits"]: (st["logits_buf"], (n, self._num_classes))}
        if st["feature"]:
            outputs[st["feature"]] = (st["feat_buf"], (n, *st["feat_shape"]))
        self._run(st["ctx"], st["input"], in_ptr, (n, *st["in_shape"]), outputs)
        logits = np.empty((n, self._num_classes), dtype=np.float32)
        self._memcpy(logits.ctypes.data, st["logits_buf"], logits.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()
        features = _Rows(st["feat_buf"], n, st["feat_row"], k) if st["feature"] else None
        return features, logits

    def take(self, features: Any, idx: np.ndarray) -> Any:
        self._use_device()
        st = self._stages[features.stage]
        row = features.row_bytes
        dst = st["compact_buf"]
        runs = row_runs(idx)
        if self._gather is not None and len(runs) > GATHER_MIN_RUNS:
            rows = np.ascontiguousarray(idx, dtype=np.int64)
            self._memcpy(self._idx_buf, rows.ctypes.data, rows.nbytes, "cudaMemcpyHostToDevice")
            self._gather.launch(features.ptr, dst, self._idx_buf, int(rows.size), row // 4, self._stream)
            return _Rows(dst, int(rows.size), row, features.stage)
        out_row = 0
        for first, length in runs:
            self._memcpy(dst + out_row * row, features.ptr + first * row, length * row, "cudaMemcpyDeviceToDevice")
            out_row += length
            self.copies += 1
        return _Rows(dst, out_row, row, features.stage)

    def full(self, x: np.ndarray) -> np.ndarray:
        if self._full is None:
            raise BundleError("the bundle's TensorRT engines have no full-depth engine; rebuild them")
        self._use_device()
        f = self._full
        in_ptr = self._upload(x)
        n = x.shape[0]
        self._run(f["ctx"], self.bundle.manifest.input.name, in_ptr, (n, *self.bundle.input_shape),
                  {f["output"]: (f["logits_buf"], (n, self._num_classes))})
        logits = np.empty((n, self._num_classes), dtype=np.float32)
        self._memcpy(logits.ctypes.data, f["logits_buf"], logits.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()
        return logits

    def close(self) -> None:
        if not getattr(self, "_allocs", None):
            return
        try:
            self._use_device()
            self._sync()
        finally:
            for ptr in self._allocs:
                self._cudart.cudaFree(ptr)
            self._allocs = []
            self._cudart.cudaStreamDestroy(self._stream)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing sensible left to do
            self.close()
