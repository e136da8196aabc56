"""Execution backends for the chained early-exit runtime, and their registry.

A backend runs the bundle's graphs; the runtime (:mod:`mexit.runtime.chained`) owns the exit logic.
The contract (:class:`Backend`) is deliberately small:

* ``run_stage(k, inputs) -> (features, logits)``: run stage ``k``. ``inputs`` is the validated float32
  input batch for ``k = 0`` and a features handle returned by stage ``k - 1`` (or by ``take``) after
  that. Features stay in whatever form is cheapest for the backend (numpy view of ONNX Runtime's own
  buffer, OrtValue on the GPU, device buffer, torch tensor); only the logits come back as numpy.
  The last stage returns ``features=None``.
* ``take(features, idx)``: the rows ``idx`` of a features handle, for the samples that did not exit.
  The runtime calls it only when some rows exit and some continue, so the batch-1 path never copies.
* ``full(x) -> logits``: the full-depth graph (vanilla baseline).

A backend is loaded with the bundle (``Backend(bundle, **options)``; :func:`get_backend` by name).
``thread_safe`` says whether ``predict`` calls may overlap (the runtime serialises them otherwise) and
``max_batch`` caps the batch one call may carry (the runtime splits larger batches).

Only ONNX Runtime is imported here. TensorRT and PyTorch backends live in their own modules and
import their heavy packages when constructed, so this module works on a box without them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from mexit.bundle import Bundle, load_bundle
from mexit.errors import BackendUnavailableError, BundleError, ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "onnxruntime-gpu", "tensorrt", "torch")

GPU_INSTALL_HINT = (
    "install onnxruntime-gpu instead of onnxruntime (`pip uninstall onnxruntime && pip install mexit[gpu]`) "
    "on a machine with an NVIDIA GPU and matching CUDA/cuDNN libraries"
)


@runtime_checkable
class Backend(Protocol):
    """What the chained runtime needs from an execution backend (see the module docstring)."""

    name: str
    thread_safe: bool
    max_batch: int | None

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]: ...

    def take(self, features: Any, idx: np.ndarray) -> Any: ...

    def full(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def session_options(*, intra_op_threads: int = 1, spinning: bool = False) -> ort.SessionOptions:
    """Explicit ONNX Runtime options for stable, comparable latency.

    One session per stage means N thread pools: ``intra_op_threads`` is pinned (default 1) rather than
    ORT's "all physical cores" default, which oversubscribes the CPU with a chain of sessions and
    makes per-exit latency noisy. Spinning threads cut latency slightly but burn CPU that co-tenants
    (and the timing measurements) feel, so it is off by default. Sequential execution and full graph
    optimisation are ORT's defaults, set here so they are recorded and cannot drift.
    """
    if intra_op_threads < 1:
        raise ConfigError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_op_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def _check_io(sess: ort.InferenceSession, path: Path, input_name: str, outputs: list[str]) -> None:
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != [input_name] or not set(outputs) <= set(got_out):
        raise BundleError(
            f"{path.name} has inputs {got_in} and outputs {got_out}, but the manifest expects "
            f"{[input_name]} -> {outputs}; the bundle is inconsistent, re-export it"
        )


class _Stage:
    """One stage session with the names the manifest gives its tensors."""

    def __init__(self, sess: ort.InferenceSession, input_name: str, feature: str | None, logits: str) -> None:
        self.sess = sess
        self.input_name = input_name
        self.feature = feature
        self.logits = logits
        self.outputs = [logits] if feature is None else [feature, logits]


def _load_stages(bundle: Bundle, make: Callable[[Path], ort.InferenceSession]) -> tuple[list[_Stage], _Stage]:
    stages = []
    for e in bundle.manifest.exits:
        path = bundle.file(e.stage_file)
        sess = make(path)
        stage = _Stage(sess, e.input_name, e.feature_output, e.logits_output)
        _check_io(sess, path, e.input_name, stage.outputs)
        stages.append(stage)
    full_sess = make(bundle.full_path)
    full = _Stage(full_sess, bundle.manifest.input.name, None, full_sess.get_outputs()[0].name)
    _check_io(full_sess, bundle.full_path, full.input_name, full.outputs)
    return stages, full


class OrtCpuBackend:
    """ONNX Runtime on the CPU, one session per stage.

    Hand-off between stages: with ``io_binding=False`` (default) features are the numpy arrays
    ``InferenceSession.run`` returns, which on the CPU EP are views of ORT's own output buffers (no
    copy), and ORT wraps contiguous float32 numpy inputs without copying either. With
    ``io_binding=True`` features stay ``OrtValue``s passed with ``bind_ortvalue_input``. Both are
    copy-free; measured here (ORT 1.32, 2-stage tiny chain, batch 1) plain ``run`` was ~30 µs per call
    cheaper than building an IOBinding per call, hence the default (a cached binding would not be
    thread-safe). ``take`` copies only the surviving rows (one ``np.take``), and only when some rows
    exit and others continue.
    """

    name = "onnxruntime"
    thread_safe = True
    max_batch: int | None = None

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        intra_op_threads: int = 1,
        spinning: bool = False,
        io_binding: bool = False,
    ) -> None:
        self.bundle = load_bundle(bundle)
        self.io_binding = io_binding
        self.options = {"intra_op_threads": intra_op_threads, "spinning": spinning, "io_binding": io_binding}
        so = session_options(intra_op_threads=intra_op_threads, spinning=spinning)
        self._stages, self._full = _load_stages(
            self.bundle, lambda p: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        )

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        st = self._stages[k]
        if self.io_binding:
            binding = st.sess.io_binding()
            if isinstance(inputs, ort.OrtValue):
                binding.bind_ortvalue_input(st.input_name, inputs)
            else:
                binding.bind_cpu_input(st.input_name, inputs)
            for name in st.outputs:
                binding.bind_output(name, "cpu")
            st.sess.run_with_iobinding(binding)
            outs = binding.get_outputs()
            return (outs[0] if st.feature else None), outs[-1].numpy()
        outs = st.sess.run(st.outputs, {st.input_name: inputs})
        return (outs[0] if st.feature else None), outs[-1]

    def take(self, features: Any, idx: np.ndarray) -> Any:
        if isinstance(features, ort.OrtValue):
            # .numpy() of a CPU OrtValue is a view; ortvalue_from_numpy wraps without copying.
            return ort.OrtValue.ortvalue_from_numpy(np.take(features.numpy(), idx, axis=0))
        return np.take(features, idx, axis=0)

    def full(self, x: np.ndarray) -> np.ndarray:
        return self._full.sess.run(self._full.outputs, {self._full.input_name: x})[0]

    def close(self) -> None:
        self._stages = []


def gather_model_bytes() -> bytes | None:
    """A one-node ONNX graph ``Gather(data, idx, axis=0)`` for on-device row compaction, or None when the
    ``onnx`` package (needed only to build it) is not installed."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, None)
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Gather", ["data", "idx"], ["out"], axis=0)], "gather",
                              [data, idx], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # old enough for every onnxruntime this package supports
    return model.SerializeToString()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mexit"


class OrtGpuBackend:
    """ONNX Runtime with the CUDA (or TensorRT) execution provider; features stay on the GPU.

    Stage inputs are bound with IOBinding: the batch is copied to the device once, each stage's feature
    output is bound to ``cuda`` and handed to the next stage as an ``OrtValue`` (no host round trip),
    and only the logits are bound to ``cpu`` for the exit decision. Compaction runs a one-node
    ``Gather`` graph on the device when the ``onnx`` package is available to build it, and otherwise
    falls back to a host round trip (correct, slower).

    ``provider="tensorrt"`` puts ONNX Runtime's TensorRT EP in front of CUDA with an engine cache
    (``trt_cache_dir``, default ``~/.cache/mexit/ort-trt/<bundle>``) and a batch profile 1..``max_batch``.
    """

    name = "onnxruntime-gpu"
    thread_safe = True
    max_batch: int | None = None

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        device_id: int = 0,
        provider: str = "cuda",
        fp16: bool = False,
        trt_cache_dir: str | os.PathLike[str] | None = None,
        max_batch: int = 256,
        intra_op_threads: int = 1,
        cudnn_conv_algo_search: str = "EXHAUSTIVE",
    ) -> None:
        if provider not in ("cuda", "tensorrt"):
            raise ConfigError(f"provider must be 'cuda' or 'tensorrt', got {provider!r}")
        self.bundle = load_bundle(bundle)
        self.device_id = int(device_id)
        available = ort.get_available_providers()
        needed = ["CUDAExecutionProvider"] + (["TensorrtExecutionProvider"] if provider == "tensorrt" else [])
        missing = [p for p in needed if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)}); {GPU_INSTALL_HINT}"
            )
        cuda_opts = {"device_id": self.device_id, "cudnn_conv_algo_search": cudnn_conv_algo_search}
        so = session_options(intra_op_threads=intra_op_threads)
        manifest = self.bundle.manifest
        cache = Path(trt_cache_dir) if trt_cache_dir else _cache_dir() / "ort-trt" / manifest.full_model.sha256[:16]
        if provider == "tensorrt":
            self.max_batch = int(max_batch)

        def providers_for(path: Path) -> list[Any]:
            chain: list[Any] = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
            if provider == "tensorrt":
                name, shape = self._input_of(path)
                dims = "x".join(str(d) for d in shape)
                trt_opts = {
                    "device_id": self.device_id,
                    "trt_fp16_enable": bool(fp16),
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_profile_min_shapes": f"{name}:1x{dims}",
                    "trt_profile_opt_shapes": f"{name}:1x{dims}",
                    "trt_profile_max_shapes": f"{name}:{int(max_batch)}x{dims}",
                }
                chain.insert(0, ("TensorrtExecutionProvider", trt_opts))
            return chain

        if provider == "tensorrt":
            cache.mkdir(parents=True, exist_ok=True)

        def make(path: Path) -> ort.InferenceSession:
            sess = ort.InferenceSession(str(path), so, providers=providers_for(path))
            first = sess.get_providers()[0]
            if first != needed[-1]:
                raise BackendUnavailableError(
                    f"ONNX Runtime fell back to {first} for {path.name} (CUDA/cuDNN or TensorRT libraries could "
                    f"not be loaded); {GPU_INSTALL_HINT}"
                )
            return sess

        self._stages, self._full = _load_stages(self.bundle, make)
        self._gather = None
        model = gather_model_bytes()
        if model is not None:
            self._gather = ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", cuda_opts)])
        else:
            log.warning("the onnx package is missing: batch compaction on the GPU will round-trip through the host")

    def _input_of(self, path: Path) -> tuple[str, tuple[int, ...]]:
        m = self.bundle.manifest
        if path == self.bundle.full_path:
            return m.input.name, m.input.sample_shape
        for e in m.exits:
            if self.bundle.file(e.stage_file) == path:
                if e.index == 0:
                    return e.input_name, m.input.sample_shape
                prev = m.exits[e.index - 1].feature_shape
                if prev is None:
                    raise BundleError(f"manifest.exits[{e.index - 1}].feature_shape is missing; re-export the bundle")
                return e.input_name, tuple(prev)
        raise BundleError(f"{path} is not a stage of this bundle")

    def _bind_input(self, binding: Any, name: str, inputs: Any) -> None:
        if isinstance(inputs, ort.OrtValue):
            binding.bind_ortvalue_input(name, inputs)
        else:
            binding.bind_cpu_input(name, inputs)

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        st = self._stages[k]
        binding = st.sess.io_binding()
        self._bind_input(binding, st.input_name, inputs)
        if st.feature:
            binding.bind_output(st.feature, "cuda", self.device_id)
        binding.bind_output(st.logits, "cpu")
        st.sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return (outs[0] if st.feature else None), outs[-1].numpy()

    def take(self, features: Any, idx: np.ndarray) -> Any:
        if self._gather is None:
            rows = np.take(features.numpy(), idx, axis=0)
            return ort.OrtValue.ortvalue_from_numpy(rows, "cuda", self.device_id)
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("data", features)
        binding.bind_cpu_input("idx", np.ascontiguousarray(idx, dtype=np.int64))
        binding.bind_output("out", "cuda", self.device_id)
        self._gather.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def full(self, x: np.ndarray) -> np.ndarray:
        binding = self._full.sess.io_binding()
        binding.bind_cpu_input(self._full.input_name, x)
        binding.bind_output(self._full.logits, "cpu")
        self._full.sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def close(self) -> None:
        self._stages = []
        self._gather = None


def _tensorrt(bundle: Bundle, **opts: Any) -> Backend:
    from mexit.runtime.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(bundle, **opts)


def _torch(bundle: Bundle, **opts: Any) -> Backend:
    from mexit.runtime.torch_backend import TorchBackend

    return TorchBackend(bundle, **opts)


_REGISTRY: dict[str, Callable[..., Backend]] = {
    "onnxruntime": OrtCpuBackend,
    "onnxruntime-gpu": OrtGpuBackend,
    "tensorrt": _tensorrt,
    "torch": _torch,
}


def get_backend(name: str, bundle: Bundle | str | os.PathLike[str], **opts: Any) -> Backend:
    """Load ``bundle`` on the backend called ``name`` (one of :data:`BACKENDS`) with its options."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    try:
        return factory(load_bundle(bundle), **opts)
    except TypeError as exc:  # a misspelt option: say which backend rejected it
        if "unexpected keyword" in str(exc):
            raise ConfigError(f"backend {name!r}: {exc}") from exc
        raise
