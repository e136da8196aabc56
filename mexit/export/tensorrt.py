"""Build TensorRT engines for a bundle's stages (TensorRT 10 Python API).

One engine per stage plus one for the full graph, each with an optimisation profile over the batch
axis (min 1, opt 1 — batch-1 latency is what early exit and timing audits care about — max
``max_batch``). Engines only run on the GPU model and TensorRT version that built them, so they are
saved under ``engines/<gpu-name>_trt<version>[_fp16]/`` and recorded in the manifest (sha256 in
``extra_files``, build settings in ``engines``). FP16 engines change logits: re-calibrate the exit
threshold for them (see shared/reference/early-exit-deployment.md §3.4).

Needs an NVIDIA GPU, ``tensorrt>=10`` and ``cuda-python`` (``pip install mexit[tensorrt]``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mexit._io import atomic_write_bytes, sha256_file
from mexit.bundle import engine_dir_name, load_bundle, update_manifest
from mexit.errors import BackendUnavailableError, BundleError, ConfigError

log = logging.getLogger(__name__)

TENSORRT_HINT = "install TensorRT 10 and cuda-python (`pip install mexit[tensorrt]`); it needs an NVIDIA GPU"
DEFAULT_WORKSPACE = 1 << 30


def import_tensorrt() -> Any:
    """``import tensorrt``, or :class:`BackendUnavailableError` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not importable ({exc}); {TENSORRT_HINT}") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old (need 10 or newer); {TENSORRT_HINT}")
    return trt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (module layout differs between cuda-python 12 and 13)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(f"cuda-python is not importable ({exc}); {TENSORRT_HINT}") from exc
    return cudart


def cuda_check(result: Any) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising on any error."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name(device_id: int = 0) -> str:
    """The CUDA device's marketing name (e.g. "NVIDIA H200"), part of the engine directory key."""
    cudart = import_cudart()
    props = cuda_check(cudart.cudaGetDeviceProperties(device_id))
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).split("\x00")[0].strip()


def build_engine(trt: Any, onnx_path: Path, *, max_batch: int, fp16: bool, workspace_bytes: int) -> bytes:
    """Parse one ONNX file and build a serialised engine with a batch profile 1/1/``max_batch``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in TensorRT 10, may vanish
            log.warning("this GPU has no fast FP16; building %s with FP16 anyway", onnx_path.name)
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(int(d) for d in tuple(tensor.shape))[1:]
        if any(d < 0 for d in rest):
            raise BundleError(f"{onnx_path.name}: input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (1, *rest), (1, *rest), (int(max_batch), *rest))
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
    trt = import_tensorrt()
    cuda_check(import_cudart().cudaSetDevice(int(device_id)))
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    key = engine_dir_name(gpu_name(device_id), str(trt.__version__), fp16=fp16)
    if key in m.engines and not overwrite:
        raise BundleError(f"bundle already has TensorRT engines {key}; pass overwrite=True (--overwrite) to rebuild")
    rel_dir = f"engines/{key}"
    out_dir = bundle.path / rel_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_rels: list[str] = []
    extra = dict(m.extra_files)
    jobs = [(bundle.file(e.stage_file), f"{rel_dir}/stage_{e.index}.plan") for e in m.exits]
    jobs.append((bundle.full_path, f"{rel_dir}/full.plan"))
    for onnx_path, rel in jobs:
        log.info("building TensorRT engine %s", rel)
        plan = build_engine(trt, onnx_path, max_batch=max_batch, fp16=fp16, workspace_bytes=workspace_bytes)
        atomic_write_bytes(bundle.path / rel, plan)
        extra[rel] = sha256_file(bundle.path / rel)
        stage_rels.append(rel)
    engines = {k: dict(v) for k, v in m.engines.items()}
    engines[key] = {
        "gpu": gpu_name(device_id),
        "tensorrt": str(trt.__version__),
        "fp16": bool(fp16),
        "max_batch": int(max_batch),
        "workspace_bytes": int(workspace_bytes),
        "stages": stage_rels[:-1],
        "full": stage_rels[-1],
    }
    update_manifest(bundle.path, extra_files=extra, engines=engines)
    return out_dir
