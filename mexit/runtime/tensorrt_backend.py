"""TensorRT backend: the bundle's prebuilt engines (``engines/<gpu>_trt<version>/stage_k.plan``), chained on
the device.

Each stage's feature output is written to a device buffer that the next stage reads directly (its
input tensor address is that buffer), so activations never leave the GPU; only the logits are copied
to the host for the exit decision. Compaction copies the surviving rows device-to-device into a
second buffer, one ``cudaMemcpyAsync`` per run of consecutive rows (rows are contiguous in the
batch-major layout, so no kernel is needed). Buffers are allocated once for the engines' ``max_batch``;
the runtime splits larger batches. Execution contexts and buffers are shared, so calls are serialised
(``thread_safe = False``).

``tensorrt`` and ``cuda-python`` are imported when the backend is constructed, never at module import.
Engines are built with :func:`mexit.export.tensorrt.build_engines` (``mexit export ... --engine tensorrt``)
on the machine that will run them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from mexit.bundle import Bundle, engine_dir_name, load_bundle
from mexit.errors import BackendUnavailableError, BundleError, InputError

TENSORRT_HINT = "install TensorRT 10 and cuda-python (`pip install mexit[tensorrt]`); it needs an NVIDIA GPU"


def _import() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not importable ({exc}); {TENSORRT_HINT}") from exc
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(f"cuda-python is not importable ({exc}); {TENSORRT_HINT}") from exc
    return trt, cudart


class _Rows:
    """A device-resident batch of features: ``n`` rows of ``row_bytes`` at ``ptr``."""

    __slots__ = ("n", "ptr", "row_bytes", "stage")

    def __init__(self, ptr: int, n: int, row_bytes: int, stage: int) -> None:
        self.ptr = ptr
        self.n = n
        self.row_bytes = row_bytes
        self.stage = stage


class TensorRTBackend:
    """Prebuilt TensorRT engines for this GPU and TensorRT version, chained through device buffers."""

    name = "tensorrt"
    thread_safe = False

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        device_id: int = 0,
        fp16: bool = False,
        engine_key: str | None = None,
    ) -> None:
        trt, cudart = _import()
        self._trt, self._cudart = trt, cudart
        self.bundle = load_bundle(bundle)
        m = self.bundle.manifest
        self._ck(cudart.cudaSetDevice(int(device_id)))
        props = self._ck(cudart.cudaGetDeviceProperties(int(device_id)))
        raw = props.name
        gpu = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split("\x00")[0].strip()
        key = engine_key or engine_dir_name(gpu, str(trt.__version__), fp16=fp16)
        info = m.engines.get(key)
        if info is None:
            have = ", ".join(sorted(m.engines)) or "none"
            raise BackendUnavailableError(
                f"bundle {self.bundle.path} has no TensorRT engines for {gpu} / TensorRT {trt.__version__} "
                f"({'fp16' if fp16 else 'fp32'}; key {key}; bundle has: {have}); build them on this machine with "
                "`mexit export RUN_DIR --out BUNDLE --engine tensorrt` or mexit.export.tensorrt.build_engines(BUNDLE)"
            )
        if len(info["stages"]) != m.model.num_exits:
            raise BundleError(
                f"TensorRT engine set {key} has {len(info['stages'])} stages for {m.model.num_exits} exits"
            )
        self.max_batch: int | None = int(info["max_batch"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._runtime = runtime
        self._stream = self._ck(cudart.cudaStreamCreate())
        self._allocs: list[int] = []
        c = m.model.num_classes
        self._stages: list[dict[str, Any]] = []
        in_row = int(np.prod(m.input.sample_shape)) * 4
        self._input_buf = self._malloc(self.max_batch * in_row)
        for e in m.exits:
            engine = self._deserialize(info["stages"][e.index])
            ctx = engine.create_execution_context()
            self._check_float32(engine, e.stage_file)
            feat_row = None if e.feature_shape is None else int(np.prod(e.feature_shape)) * 4
            if e.feature_output is not None and feat_row is None:
                raise BundleError(f"manifest.exits[{e.index}].feature_shape is missing; re-export the bundle")
            self._stages.append({
                "engine": engine,
                "ctx": ctx,
                "input": e.input_name,
                "feature": e.feature_output,
                "logits": e.logits_output,
                "in_shape": m.input.sample_shape if e.index == 0 else tuple(m.exits[e.index - 1].feature_shape or ()),
                "feat_row": feat_row,
                "feat_buf": self._malloc(self.max_batch * feat_row) if feat_row else 0,
                "compact_buf": self._malloc(self.max_batch * feat_row) if feat_row else 0,
                "logits_buf": self._malloc(self.max_batch * c * 4),
            })
        self._full = None
        if info.get("full"):
            engine = self._deserialize(info["full"])
            out_name = next(
                engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
            )
            self._full = {"engine": engine, "ctx": engine.create_execution_context(), "output": out_name,
                          "logits_buf": self._malloc(self.max_batch * c * 4)}
        self._num_classes = c
        self._in_row = in_row

    # --- CUDA helpers ----------------------------------------------------------------------------
    def _ck(self, result: Any) -> Any:
        cudart = self._cudart
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != int(cudart.cudaError_t.cudaSuccess):
            _, text = cudart.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

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
                f"TensorRT could not load {rel} (built for another GPU or TensorRT version?); rebuild the engines here"
            )
        return engine

    def _check_float32(self, engine: Any, what: str) -> None:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_dtype(name) != self._trt.float32:
                raise BundleError(f"engine for {what}: tensor {name} is not float32; rebuild the engines")

    # --- Backend protocol ------------------------------------------------------------------------
    def _run(self, ctx: Any, in_name: str, in_ptr: int, shape: tuple[int, ...], outputs: dict[str, int]) -> None:
        if not ctx.set_input_shape(in_name, shape):
            raise InputError(f"TensorRT rejected input shape {shape} for {in_name} (engine max batch {self.max_batch})")
        ctx.set_tensor_address(in_name, in_ptr)
        for name, ptr in outputs.items():
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def _upload(self, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._memcpy(self._input_buf, x.ctypes.data, x.nbytes, "cudaMemcpyHostToDevice")
        return self._input_buf

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        st = self._stages[k]
        if isinstance(inputs, np.ndarray):
            n, in_ptr = inputs.shape[0], self._upload(inputs)
        else:
            n, in_ptr = inputs.n, inputs.ptr
        outputs = {st["logits"]: st["logits_buf"]}
        if st["feature"]:
            outputs[st["feature"]] = st["feat_buf"]
        self._run(st["ctx"], st["input"], in_ptr, (n, *st["in_shape"]), outputs)
        logits = np.empty((n, self._num_classes), dtype=np.float32)
        self._memcpy(logits.ctypes.data, st["logits_buf"], logits.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()
        features = _Rows(st["feat_buf"], n, st["feat_row"], k) if st["feature"] else None
        return features, logits

    def take(self, features: Any, idx: np.ndarray) -> Any:
        st = self._stages[features.stage]
        row = features.row_bytes
        dst = st["compact_buf"]
        idx = np.asarray(idx, dtype=np.int64)
        # Copy runs of consecutive rows: one device-to-device copy per run.
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        out_row = 0
        for run in np.split(idx, breaks):
            if run.size == 0:
                continue
            self._memcpy(dst + out_row * row, features.ptr + int(run[0]) * row, run.size * row,
                         "cudaMemcpyDeviceToDevice")
            out_row += run.size
        return _Rows(dst, int(idx.size), row, features.stage)

    def full(self, x: np.ndarray) -> np.ndarray:
        if self._full is None:
            raise BundleError("the bundle's TensorRT engines have no full-depth engine; rebuild them")
        f = self._full
        in_ptr = self._upload(x)
        n = x.shape[0]
        self._run(f["ctx"], self.bundle.manifest.input.name, in_ptr, (n, *self.bundle.input_shape),
                  {f["output"]: f["logits_buf"]})
        logits = np.empty((n, self._num_classes), dtype=np.float32)
        self._memcpy(logits.ctypes.data, f["logits_buf"], logits.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()
        return logits

    def close(self) -> None:
        if not getattr(self, "_allocs", None):
            return
        try:
            self._sync()
        finally:
            for ptr in self._allocs:
                self._cudart.cudaFree(ptr)
            self._allocs = []
            self._cudart.cudaStreamDestroy(self._stream)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing sensible left to do
            self.close()
