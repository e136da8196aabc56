"""Build TensorRT engines for a bundle's stages (TensorRT 10 and 11 Python API).

One engine per stage plus one for the full graph, each with an optimisation profile over the batch
axis (min 1, opt ``opt_batch`` — default 1: batch-1 latency is what early exit and timing audits care
about — max ``max_batch``). All engines of one build share a builder and a timing cache, so a layer
shape timed for one stage is not timed again for the next. Engines only run on the GPU model and
TensorRT version that built them, so they are saved under ``engines/<gpu-name>_trt<version>[_fp16]/``
and recorded in the manifest (sha256 in ``extra_files``, build settings in ``engines``).

Precision:

* FP32 (default) with TF32 *off* (``tf32=False``): TensorRT enables TF32 by default, which drifts logits
  by ~1e-3 from the CPU parity check and flips exits near the threshold.
* FP16 on TensorRT 10: the ``BuilderFlag.FP16`` weak-typing flag; I/O stays FP32.
* FP16 on TensorRT 11, which removed that flag: each ONNX graph is cast to FP16 with FP32 inputs and
  outputs (NVIDIA ModelOpt AutoCast when installed, else ``onnxconverter-common``'s float16 converter)
  and built as a strongly typed network. Neither converter present: refused *before* any work
  (:func:`check_build_support`), never an ``AttributeError`` after a long export.

FP16 (and TF32) engines change logits: re-calibrate the exit threshold for them. The TensorRT and
cuda-python import checks live in :mod:`mexit.runtime.tensorrt_backend` (export may import the runtime,
not the reverse). Needs an NVIDIA GPU, ``tensorrt>=10`` and ``cuda-python`` (``pip install mexit[tensorrt]``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mexit._io import atomic_write_bytes, sha256_file
from mexit.bundle import engine_dir_name, load_bundle, update_manifest
from mexit.errors import BackendUnavailableError, BundleError, ConfigError
from mexit.runtime.tensorrt_backend import TENSORRT_HINT, cuda_check, gpu_name, import_cudart, import_tensorrt

log = logging.getLogger(__name__)

__all__ = [
    "TENSORRT_HINT",
    "build_engine",
    "build_engines",
    "check_build_support",
    "fp16_mode",
    "import_cudart",
    "import_tensorrt",
]

DEFAULT_WORKSPACE = 1 << 30
FP16_CONVERTER_HINT = (
    "TensorRT 11 builds FP16 engines only from an FP16 ONNX graph: install a converter "
    '(`pip install onnxconverter-common`, or NVIDIA ModelOpt `pip install "nvidia-modelopt[onnx]"`), '
    "or build FP32 engines (drop --fp16)"
)


def fp16_mode(trt: Any) -> str:
    """How this TensorRT builds FP16 engines: ``"flag"`` (TensorRT 10: ``BuilderFlag.FP16``) or
    ``"strongly-typed"`` (TensorRT 11: an FP16-cast ONNX graph with FP32 I/O)."""
    return "flag" if hasattr(trt.BuilderFlag, "FP16") else "strongly-typed"


def _fp16_converter() -> Any | None:
    """A function ``Path -> onnx.ModelProto`` casting an ONNX file to FP16 with FP32 I/O, or None."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # NVIDIA's recommended path

        def modelopt_cast(path: Path) -> Any:
            return convert_to_mixed_precision(onnx_path=str(path), low_precision_type="fp16", keep_io_types=True)

        return modelopt_cast
    except ImportError:
        pass
    try:
        from onnxconverter_common import float16
    except ImportError:
        return None

    def converter_cast(path: Path) -> Any:
        import onnx

        return float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)

    return converter_cast


def check_build_support(*, fp16: bool, device_id: int = 0) -> Any:
    """Everything an engine build needs, checked up front (before a long export): TensorRT >= 10,
    cuda-python, a GPU ``device_id``, and for ``fp16`` on TensorRT 11 an ONNX FP16 converter.
    Returns the ``tensorrt`` module; raises :class:`BackendUnavailableError` with the fix."""
    trt = import_tensorrt()
    cudart = import_cudart()
    gpu_name(device_id, cudart)  # no GPU / no driver / bad index: said here, in one line
    if fp16 and fp16_mode(trt) == "strongly-typed" and _fp16_converter() is None:
        raise BackendUnavailableError(f"TensorRT {trt.__version__}: {FP16_CONVERTER_HINT}")
    return trt


def _network_for(trt: Any, builder: Any, onnx_path: Path, fp16: bool, logger: Any) -> tuple[Any, Any]:
    """Parse ``onnx_path`` into a network (strongly typed from an FP16-cast graph on TensorRT 11)."""
    strongly_typed = fp16 and fp16_mode(trt) == "strongly-typed"
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # implied (and maybe gone) in 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if strongly_typed:
        convert = _fp16_converter()
        if convert is None:
            raise BackendUnavailableError(f"TensorRT {trt.__version__}: {FP16_CONVERTER_HINT}")
        model = convert(onnx_path)
        ok = parser.parse(model.SerializeToString(), str(onnx_path.parent))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return network, parser


def build_engine(
    trt: Any,
    onnx_path: Path,
    *,
    max_batch: int,
    fp16: bool,
    workspace_bytes: int,
    opt_batch: int = 1,
    tf32: bool = False,
    builder: Any | None = None,
    timing_cache: Any | None = None,
) -> bytes:
    """Parse one ONNX file and build a serialised engine with a batch profile 1/``opt_batch``/``max_batch``.

    Pass the same ``builder`` and ``timing_cache`` for every engine of a bundle (as :func:`build_engines`
    does) so that layer timings are shared across stages.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = builder or trt.Builder(logger)
    network, _parser = _network_for(trt, builder, onnx_path, fp16, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, False)
    if hasattr(trt.BuilderFlag, "TF32"):
        if tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
    if fp16 and fp16_mode(trt) == "flag":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(int(d) for d in tuple(tensor.shape))[1:]
        if any(d < 0 for d in rest):
            raise BundleError(f"{onnx_path.name}: input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (1, *rest), (int(opt_batch), *rest), (int(max_batch), *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    return bytes(plan)


def build_engines(
    bundle_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    max_batch: int = 256,
    opt_batch: int = 1,
    tf32: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    device_id: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build engines for every stage and the full graph of the bundle at ``bundle_dir``; return their directory.

    The manifest is rewritten atomically after all plans are written, so a failed build leaves the
    bundle as it was (at worst with unreferenced plan files, which loading ignores).
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"opt_batch must be in 1..max_batch ({max_batch}), got {opt_batch}")
    trt = check_build_support(fp16=fp16, device_id=device_id)
    cudart = import_cudart()
    cuda_check(cudart.cudaSetDevice(int(device_id)), cudart)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    gpu = gpu_name(device_id, cudart)
    key = engine_dir_name(gpu, str(trt.__version__), fp16=fp16)
    if key in m.engines and not overwrite:
        raise BundleError(f"bundle already has TensorRT engines {key}; pass overwrite=True (--overwrite) to rebuild")
    rel_dir = f"engines/{key}"
    out_dir = bundle.path / rel_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    timing_cache = builder.create_builder_config().create_timing_cache(b"")
    stage_rels: list[str] = []
    extra = dict(m.extra_files)
    jobs = [(bundle.file(e.stage_file), f"{rel_dir}/stage_{e.index}.plan") for e in m.exits]
    jobs.append((bundle.full_path, f"{rel_dir}/full.plan"))
    for onnx_path, rel in jobs:
        log.info("building TensorRT engine %s", rel)
        plan = build_engine(trt, onnx_path, max_batch=max_batch, fp16=fp16, workspace_bytes=workspace_bytes,
                            opt_batch=opt_batch, tf32=tf32, builder=builder, timing_cache=timing_cache)
        atomic_write_bytes(bundle.path / rel, plan)
        extra[rel] = sha256_file(bundle.path / rel)
        stage_rels.append(rel)
    engines = {k: dict(v) for k, v in m.engines.items()}
    engines[key] = {
        "gpu": gpu,
        "tensorrt": str(trt.__version__),
        "fp16": bool(fp16),
        "fp16_mode": fp16_mode(trt) if fp16 else None,
        "tf32": bool(tf32),
        "max_batch": int(max_batch),
        "opt_batch": int(opt_batch),
        "workspace_bytes": int(workspace_bytes),
        "stages": stage_rels[:-1],
        "full": stage_rels[-1],
    }
    update_manifest(bundle.path, extra_files=extra, engines=engines)
    return out_dir

