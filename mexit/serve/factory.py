"""Build the runtime a deployment serves from command-line style options.

Shared by ``mexit serve`` and ``mexit serve`` (which :class:`mexit.serve.ServerProcess`
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
    device: int | None = None,
    fp16: bool = False,
    backend_opts: Mapping[str, Any] | None = None,
    defense: str | None = None,
    defense_params: Mapping[str, Any] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    adapt: bool = True,
) -> ServedRuntime:
    """Load the bundle into an :class:`~mexit.runtime.EarlyExitRuntime`, guarded when a defense is asked for.

    ``backend``/``threads``/``device``/``fp16`` and the backend's own ``backend_opts`` go to the runtime's backend
    registry; ``defense`` names a
    registered defense (:func:`mexit.defense.defense_names`) with its ``defense_params`` (validated there; a
    defense that cannot be built raises, the server never starts unguarded). Guarding calibrates the
    per-exit clean times at start-up, which takes a moment; ``adapt`` lets a fitted defense refit on live times
    (:class:`~mexit.defense.guarded.GuardedRuntime`).
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    from mexit.runtime import EarlyExitRuntime

    opts: dict[str, Any] = dict(backend_opts or {})
    if device is not None:
        opts["device"] = device
    if fp16:
        opts["fp16"] = True
    runtime: Any = EarlyExitRuntime(bundle, backend=backend, threads=threads, **opts)
    manifest = _manifest_of(runtime, bundle)
    model_name = _default_model_name(manifest, bundle)
    metadata = _metadata_from_manifest(manifest)
    if defense is not None:
        runtime = guard_runtime(runtime, defense, defense_params, key_file=key_file, adapt=adapt,
                                kind=str(_get(manifest, ("dataset", "kind"), ("kind",)) or "tabular"))
    elif key_file is not None:
        logger.warning("--key-file is ignored without a defense")
    return ServedRuntime(runtime=runtime, model_name=model_name, metadata=metadata)


def guard_runtime(runtime: Runtime, defense: str, params: Mapping[str, Any] | None, *,
                  key_file: str | os.PathLike[str] | None, kind: str, adapt: bool = True) -> Runtime:
    """``runtime`` wrapped by the registered ``defense`` (validated ``params``; key from file or environment;
    ``adapt``: see :class:`~mexit.defense.guarded.GuardedRuntime`)."""
    from mexit.defense.keys import load_key
    from mexit.defense.registry import build_guarded, get_spec, parse_defense

    config = parse_defense(defense, dict(params or {}))
    key = load_key(key_file) if get_spec(defense).needs_key else None
    return build_guarded(runtime, config, key=key, kind=kind, adapt=adapt)


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
