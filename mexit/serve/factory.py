"""Build the runtime a deployment serves from command-line style options.

Shared by ``mexit serve`` and ``python -m mexit.serve`` (which :class:`mexit.serve.ServerProcess`
runs), so that both load, guard and name a model the same way.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mexit.errors import ConfigError
from mexit.runtime.types import Runtime

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "onnxruntime"


@dataclass(frozen=True)
class ServedRuntime:
    """A runtime ready to serve, its default model name and extra model-metadata keys."""

    runtime: Runtime
    model_name: str
    metadata: dict[str, Any] = field(default_factory=dict)


def build_served_runtime(
    bundle: str | os.PathLike[str],
    *,
    backend: str = DEFAULT_BACKEND,
    threads: int | None = 1,
    sigma_ms: float | None = None,
    key_file: str | os.PathLike[str] | None = None,
    pad_to_final: bool = False,
) -> ServedRuntime:
    """Load the bundle into an :class:`~mexit.runtime.EarlyExitRuntime`, guarded when asked.

    ``sigma_ms`` wraps it in a :class:`~mexit.defense.GuardedRuntime` with a keyed
    :class:`~mexit.defense.TimeGuard` (key from ``key_file`` or the environment, hasher chosen by the
    dataset kind); ``pad_to_final`` uses constant-time padding to the final exit instead. Guarding
    calibrates per-exit clean times at start-up, which takes a moment.
    """
    if sigma_ms is not None and pad_to_final:
        raise ConfigError("choose one defense: --timeguard-sigma (TimeGuard) or --pad-to-final (constant time)")
    if sigma_ms is not None and not sigma_ms >= 0:
        raise ConfigError(f"--timeguard-sigma must be a number of milliseconds >= 0, got {sigma_ms}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    from mexit.runtime import EarlyExitRuntime

    runtime = _construct(EarlyExitRuntime, bundle, backend=backend, threads=threads)
    manifest = _manifest_of(runtime, bundle)
    model_name = _default_model_name(manifest, bundle)
    metadata = _metadata_from_manifest(manifest)

    if sigma_ms is not None or pad_to_final:
        from mexit.defense import ConstantTimePadding, GuardedRuntime, TimeGuard, hasher_for, load_key

        if pad_to_final:
            policy: Any = ConstantTimePadding()
        else:
            kind = _get(manifest, ("dataset", "kind"), ("kind",)) or "tabular"
            policy = TimeGuard(float(sigma_ms) / 1e3, load_key(key_file), hasher_for(str(kind)))
        runtime = GuardedRuntime(runtime, policy)  # calibrates per-exit clean times now
    elif key_file is not None:
        logger.warning("--key-file is ignored without --timeguard-sigma")
    return ServedRuntime(runtime=runtime, model_name=model_name, metadata=metadata)


def max_body_bytes(mb: float) -> int:
    """``--max-body-mb`` (MiB) in bytes, validated."""
    if not mb > 0:
        raise ConfigError(f"--max-body-mb must be > 0, got {mb}")
    return int(mb * 2**20)


def runtime_from_factory(spec: str, kwargs: Mapping[str, Any] | str | None = None) -> ServedRuntime:
    """Call ``"package.module:callable"`` (with ``kwargs``, a dict or a JSON object) for a runtime.

    For serving models that are not bundles, e.g. the toy runtime of :mod:`mexit.serve.testing` in
    tests and benchmarks. The callable may return a Runtime or a :class:`ServedRuntime`.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--factory must look like 'package.module:callable', got {spec!r}")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError as exc:
            raise ConfigError(f"--factory-kwargs must be a JSON object: {exc}") from None
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError("--factory-kwargs must be a JSON object")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import factory module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"factory {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    made = obj(**dict(kwargs or {}))
    if isinstance(made, ServedRuntime):
        return made
    if not isinstance(made, Runtime):
        raise ConfigError(f"factory {spec!r} returned {type(made).__name__}, not a Runtime")
    name = getattr(made, "model_name", None) or attr.split(".")[-1].lower()
    return ServedRuntime(runtime=made, model_name=str(name), metadata={})


#: The backend option that sets the runtime's thread count, per backend (None: not settable).
_THREAD_OPTION = {"onnxruntime": "intra_op_threads", "onnxruntime-gpu": "intra_op_threads", "torch": "threads",
                  "tensorrt": None}


def _construct(cls: Any, bundle: str | os.PathLike[str], *, backend: str, threads: int | None) -> Runtime:
    """``cls(bundle, backend=…, <thread option>=threads)``, the option named as the backend calls it."""
    opts: dict[str, Any] = {}
    option = _THREAD_OPTION.get(backend)
    if threads is not None and option is not None:
        opts[option] = threads
    elif threads not in (None, 1):
        logger.warning("backend %s has no thread-count option; --threads %d ignored", backend, threads)
    return cls(bundle, backend=backend, **opts)


def _manifest_of(runtime: Any, bundle: str | os.PathLike[str]) -> Any:
    for holder in (runtime, getattr(runtime, "bundle", None)):
        manifest = getattr(holder, "manifest", None)
        if manifest is not None:
            return manifest
    try:
        from mexit.runtime import load_bundle

        return load_bundle(bundle).manifest
    except (ImportError, AttributeError):
        return {}


def _get(obj: Any, *paths: tuple[str, ...]) -> Any:
    """The first present value among dotted ``paths`` in a dict-or-attribute tree."""
    for path in paths:
        cur = obj
        for key in path:
            cur = cur.get(key) if isinstance(cur, Mapping) else getattr(cur, key, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


def _default_model_name(manifest: Any, bundle: str | os.PathLike[str]) -> str:
    name = _get(manifest, ("model", "name"), ("name",))
    if name:
        return str(name).replace("/", "-")
    arch = _get(manifest, ("model", "arch"), ("arch",))
    dataset = _get(manifest, ("dataset", "name"), ("dataset",))
    if arch and isinstance(dataset, str):
        return f"{arch}-{dataset}".replace("/", "-")
    return os.path.basename(os.path.normpath(os.fspath(bundle))) or "model"


def _metadata_from_manifest(manifest: Any) -> dict[str, Any]:
    """Public facts about the model for the metadata endpoint (no thresholds, no per-exit details)."""
    meta: dict[str, Any] = {}
    dataset = _get(manifest, ("dataset", "name"))
    if dataset is None and isinstance(_get(manifest, ("dataset",)), str):
        dataset = _get(manifest, ("dataset",))
    if dataset is not None:
        meta["dataset"] = str(dataset)
    classes = _get(manifest, ("model", "class_names"), ("class_names",), ("classes",))
    if isinstance(classes, list | tuple):
        meta["class_names"] = [str(c) for c in classes]
    return meta
