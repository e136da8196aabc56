"""Fake ``tensorrt`` and ``cuda.bindings.runtime`` modules that run on the CPU, for the GPU code paths.

They implement exactly the API surface mexit uses, with the semantics that matter for bugs:

* device memory is a set of ``bytearray`` allocations addressed by integer pointers, so a wrong offset
  in a ``cudaMemcpyAsync`` (compaction) reads or writes the wrong rows — or an unallocated address,
  which raises;
* the current device is per thread, as in CUDA: memory or stream work from a thread that never
  called ``cudaSetDevice`` for the allocation's device raises;
* a "plan" is JSON holding the ONNX graph the fake builder parsed; the fake engine runs it with ONNX
  Runtime on the CPU, reading its input from and writing its outputs to fake device memory at the
  addresses the backend set, and checks the input shape against the engine's profile;
* ``BuilderFlag`` has ``FP16`` on TensorRT 10 and not on 11 (removed there), like the real modules.
"""

from __future__ import annotations

import base64
import ctypes
import importlib.machinery
import json
import sys
import threading
import types
from typing import Any

import numpy as np
import onnxruntime as ort

SUCCESS = 0
ERR_INVALID_VALUE = 1
ERR_INVALID_DEVICE = 101


class FakeCudart(types.ModuleType):
    """``cuda.bindings.runtime`` on host memory (see the module docstring)."""

    def __init__(self, gpus: tuple[str, ...] = ("Fake GPU X",)) -> None:
        super().__init__("cuda.bindings.runtime")
        self.gpus = gpus
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=SUCCESS)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                                    cudaMemcpyDeviceToDevice=3)
        self.allocs: dict[int, tuple[bytearray, int]] = {}  # base pointer -> (memory, device)
        self._next = 0x7F0000000000
        self._tls = threading.local()
        self.memcpy_calls: list[tuple[str, int]] = []  # (kind, nbytes)
        self.set_device_calls: list[tuple[str, int]] = []  # (thread name, device)

    # --- device and errors ---
    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return SUCCESS, len(self.gpus)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        if not 0 <= device < len(self.gpus):
            return ERR_INVALID_DEVICE, None
        return SUCCESS, types.SimpleNamespace(name=self.gpus[device].encode() + b"\x00" * 8, major=9, minor=0)

    def cudaSetDevice(self, device: int) -> tuple[int]:
        if not 0 <= device < len(self.gpus):
            return (ERR_INVALID_DEVICE,)
        self._tls.device = device
        self.set_device_calls.append((threading.current_thread().name, device))
        return (SUCCESS,)

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return SUCCESS, f"fake CUDA error {int(err)}".encode()

    def current_device(self) -> int | None:
        return getattr(self._tls, "device", None)

    # --- memory ---
    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        device = self.current_device()
        if device is None:
            return ERR_INVALID_VALUE, 0
        ptr = self._next
        self._next += (int(nbytes) + 0xFFFF) & ~0xFFF  # gaps between allocations: overruns are caught
        self.allocs[ptr] = (bytearray(int(nbytes)), device)
        return SUCCESS, ptr

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.allocs.pop(int(ptr), None)
        return (SUCCESS,)

    def _view(self, ptr: int, nbytes: int) -> memoryview:
        for base, (mem, device) in self.allocs.items():
            if base <= ptr and ptr + nbytes <= base + len(mem):
                if device != self.current_device():
                    raise AssertionError(f"device memory of GPU {device} used from a thread whose current device is "
                                         f"{self.current_device()} (cudaSetDevice missing on this thread)")
                return memoryview(mem)[ptr - base : ptr - base + nbytes]
        raise AssertionError(f"access to unallocated device memory {ptr:#x}+{nbytes}")

    def read(self, ptr: int, nbytes: int) -> bytes:
        return bytes(self._view(ptr, nbytes))

    def write(self, ptr: int, data: bytes) -> None:
        self._view(ptr, len(data))[:] = data

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:
        nbytes = int(nbytes)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.write(dst, ctypes.string_at(src, nbytes))
            name = "h2d"
        elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ctypes.memmove(dst, self.read(src, nbytes), nbytes)
            name = "d2h"
        elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            self.write(dst, self.read(src, nbytes))
            name = "d2d"
        else:
            return (ERR_INVALID_VALUE,)
        self.memcpy_calls.append((name, nbytes))
        return (SUCCESS,)

    # --- streams ---
    def cudaStreamCreate(self) -> tuple[int, int]:
        return SUCCESS, 0x5EED

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (SUCCESS,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        return (SUCCESS,)


class FakeNvrtc(types.ModuleType):
    """``cuda.bindings.nvrtc``: "compiles" by checking the source names the kernel the backend looks up."""

    def __init__(self) -> None:
        super().__init__("cuda.bindings.nvrtc")
        self.options: list[list[bytes]] = []

    def nvrtcCreateProgram(self, src: bytes, name: bytes, n: int, headers: list, names: list) -> tuple[int, Any]:
        return SUCCESS, types.SimpleNamespace(src=src)

    def nvrtcCompileProgram(self, prog: Any, n: int, opts: list[bytes]) -> tuple[int]:
        self.options.append(list(opts))
        return (SUCCESS if b"gather_rows" in prog.src and n == len(opts) else ERR_INVALID_VALUE,)

    def nvrtcGetPTXSize(self, prog: Any) -> tuple[int, int]:
        return SUCCESS, 16

    def nvrtcGetPTX(self, prog: Any, buf: bytes) -> tuple[int]:
        return (SUCCESS,)


class FakeDriver(types.ModuleType):
    """``cuda.bindings.driver``: ``cuLaunchKernel`` of ``gather_rows`` decodes the kernel-argument array the
    way CUDA does (an array of pointers to each argument) and performs the gather in fake device memory."""

    def __init__(self, cudart: FakeCudart) -> None:
        super().__init__("cuda.bindings.driver")
        self.cudart = cudart
        self.launches: list[tuple[int, int]] = []  # (n_rows, row_elems)

    def CUstream(self, handle: int) -> int:
        return int(handle)

    def cuModuleLoadData(self, image: int) -> tuple[int, str]:
        return SUCCESS, "module"

    def cuModuleGetFunction(self, module: str, name: bytes) -> tuple[int, bytes]:
        return (SUCCESS, name) if name == b"gather_rows" else (ERR_INVALID_VALUE, b"")

    def cuLaunchKernel(self, fn: bytes, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int,
                       stream: int, args: int, extra: int) -> tuple[int]:
        ptrs = (ctypes.c_uint64 * 5).from_address(args)
        src, dst, idx_dev = (ctypes.c_uint64.from_address(ptrs[i]).value for i in range(3))
        n_rows, row_elems = (ctypes.c_int64.from_address(ptrs[i]).value for i in (3, 4))
        if gx * bx <= 0 or fn != b"gather_rows":
            return (ERR_INVALID_VALUE,)
        idx = np.frombuffer(self.cudart.read(idx_dev, n_rows * 8), dtype=np.int64)
        row = row_elems * 4
        for j, r in enumerate(idx):
            self.cudart.write(dst + j * row, self.cudart.read(src + int(r) * row, row))
        self.launches.append((n_rows, row_elems))
        return (SUCCESS,)


# ------------------------------------------------------------------------------------------------
# TensorRT
# ------------------------------------------------------------------------------------------------


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.model: bytes | None = None
        self.inputs: list[_Tensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class _Parser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self.network = network
        self.num_errors = 0

    def _load(self, data: bytes) -> bool:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.network.model = data
        self.network.inputs = [_Tensor(i.name, tuple(-1 if not isinstance(d, int) else d for d in i.shape))
                               for i in sess.get_inputs()]
        return True

    def parse_from_file(self, path: str) -> bool:
        with open(path, "rb") as f:
            return self._load(f.read())

    def parse(self, data: bytes, path: str | None = None) -> bool:
        return self._load(bytes(data))

    def get_error(self, i: int) -> str:
        return "fake parser error"


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Config:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.flags: set[str] = {"TF32"}  # TensorRT turns TF32 on by default
        self.profiles: list[_Profile] = []
        self.timing_cache: Any = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.workspace = size

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> Any:
        return types.SimpleNamespace(id=len(self.trt.timing_caches))

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        self.trt.timing_caches.append(cache)
        return True

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _Builder:
    def __init__(self, trt: FakeTensorRT, logger: Any) -> None:
        self.trt = trt

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config(self.trt)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        assert network.model is not None, "build before parse"
        (profile,) = config.profiles
        plan = {
            "magic": f"fake-trt-{self.trt.__version__}",
            "onnx": base64.b64encode(network.model).decode(),
            "flags": sorted(config.flags),
            "network_flags": network.flags,
            "profile": {k: [list(s) for s in v] for k, v in profile.shapes.items()},
        }
        self.trt.builds.append(plan)
        return json.dumps(plan).encode()


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.input_shapes_seen: list[tuple[int, ...]] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(hi) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        self.input_shapes_seen.append(tuple(shape))
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        n = self.shapes[self.engine.input_name][0]
        return (n, *self.engine.sample_shapes[name])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream: int) -> bool:
        cudart = self.engine.trt.cudart
        in_name = self.engine.input_name
        shape = self.shapes[in_name]
        nbytes = int(np.prod(shape)) * 4
        x = np.frombuffer(cudart.read(self.addresses[in_name], nbytes), dtype=np.float32).reshape(shape)
        outs = self.engine.sess.run(self.engine.output_names, {in_name: x})
        for name, value in zip(self.engine.output_names, outs, strict=True):
            value = np.ascontiguousarray(value, dtype=np.float32)
            cudart.write(self.addresses[name], value.tobytes())
        self.engine.trt.executions += 1
        return True


class _Engine:
    def __init__(self, trt: FakeTensorRT, plan: dict[str, Any]) -> None:
        self.trt = trt
        self.plan = plan
        self.sess = ort.InferenceSession(base64.b64decode(plan["onnx"]), providers=["CPUExecutionProvider"])
        self.input_name = self.sess.get_inputs()[0].name
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in plan["profile"].items()}
        probe = np.zeros((1, *self.profile[self.input_name][0][1:]), dtype=np.float32)
        self.sample_shapes = {n: tuple(v.shape[1:]) for n, v in zip(self.output_names,
                                                                       self.sess.run(None, {self.input_name: probe}),
                                                                       strict=True)}
        self.contexts: list[_Context] = []

    @property
    def num_io_tensors(self) -> int:
        return 1 + len(self.output_names)

    def get_tensor_name(self, i: int) -> str:
        return [self.input_name, *self.output_names][i]

    def get_tensor_mode(self, name: str) -> str:
        return self.trt.TensorIOMode.INPUT if name == self.input_name else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return self.trt.float32

    def create_execution_context(self) -> _Context:
        ctx = _Context(self)
        self.contexts.append(ctx)
        return ctx


class _Runtime:
    def __init__(self, trt: FakeTensorRT, logger: Any) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None
        if plan.get("magic") != f"fake-trt-{self.trt.__version__}":
            return None  # what TensorRT does with a plan from another version
        engine = _Engine(self.trt, plan)
        self.trt.engines.append(engine)
        return engine


class FakeTensorRT(types.ModuleType):
    """``tensorrt`` with a builder that records what it was asked and engines that run on ONNX Runtime."""

    def __init__(self, cudart: FakeCudart, version: str = "10.9.0") -> None:
        super().__init__("tensorrt")
        self.cudart = cudart
        self.__version__ = version
        major = int(version.split(".")[0])
        flags = ["TF32"] + (["FP16"] if major < 11 else [])
        self.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        self.float32 = "float32"
        self.builds: list[dict[str, Any]] = []
        self.engines: list[_Engine] = []
        self.timing_caches: list[Any] = []
        self.executions = 0

        class Logger:
            WARNING = 2

            def __init__(self, severity: int = 2) -> None:
                self.severity = severity

        self.Logger = Logger

    def Builder(self, logger: Any) -> _Builder:
        return _Builder(self, logger)

    def OnnxParser(self, network: _Network, logger: Any) -> _Parser:
        return _Parser(network, logger)

    def Runtime(self, logger: Any) -> _Runtime:
        return _Runtime(self, logger)


def _spec(module: types.ModuleType) -> types.ModuleType:
    """Give a fake module a ModuleSpec: importlib.util.find_spec (torch._dynamo calls it on every name it
    knows, tensorrt included) refuses modules whose ``__spec__`` is None."""
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    return module


def install(monkeypatch: Any, *, version: str = "10.9.0", gpus: tuple[str, ...] = ("Fake GPU X",),
            nvrtc: bool = True) -> tuple[FakeTensorRT, FakeCudart]:
    """Put fake ``tensorrt`` and ``cuda.bindings.{runtime,driver,nvrtc}`` in ``sys.modules`` for one test
    (``nvrtc=False``: NVRTC not importable, as on an install without its library)."""
    cudart = _spec(FakeCudart(gpus))
    trt = _spec(FakeTensorRT(cudart, version))
    cuda_pkg = _spec(types.ModuleType("cuda"))
    bindings = _spec(types.ModuleType("cuda.bindings"))
    driver = _spec(FakeDriver(cudart))
    cudart.driver = driver  # type: ignore[attr-defined]
    nv = _spec(FakeNvrtc()) if nvrtc else None
    bindings.runtime = cudart  # type: ignore[attr-defined]
    bindings.driver = driver  # type: ignore[attr-defined]
    if nv is not None:
        bindings.nvrtc = nv  # type: ignore[attr-defined]
    cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", nv)
    return trt, cudart
