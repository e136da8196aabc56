"""The backend registry: one place that knows every execution backend, its description and its options.

Every backend class registers itself with :func:`register_backend` in its own module, and every
backend takes the same three common options, so callers (the CLI, the audit, a notebook) need not
know which backend calls its thread count what:

* ``threads`` — host threads for the backend's own work: ONNX Runtime intra-op threads, torch's
  ``set_num_threads``; TensorRT runs everything on the GPU and accepts it without using it (logged at
  debug level).
* ``device`` — the GPU index (``0``, ``"1"``, or for torch also ``"cuda:1"``/``"cpu"``); CPU backends
  refuse a GPU index (``None`` and ``"cpu"`` are accepted everywhere the backend can run on the CPU).
* ``fp16`` — which TensorRT engine flavour to run (``tensorrt``, and ``onnxruntime-gpu`` with its
  TensorRT provider); refused where it means nothing rather than silently ignored.

Backend-specific options (``int8_heads``, ``provider``, ``cuda_graphs``, …) are the other keyword-only
parameters of the backend's constructor; :func:`get_backend` checks names before constructing, so a
misspelt option is one :class:`~mexit.errors.ConfigError` line listing the valid ones.

Adding a backend = one module with a class decorated by :func:`register_backend` + its module name in
:data:`BUILTIN_MODULES` (+ an extra in pyproject for its dependencies). The modules are imported lazily
and must not import their heavy packages (TensorRT, torch, OpenVINO) at module level.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mexit.errors import ConfigError

if TYPE_CHECKING:
    from mexit.bundle import Bundle
    from mexit.runtime.types import Backend

log = logging.getLogger(__name__)

#: Options every backend takes (see the module docstring).
COMMON_OPTIONS = ("threads", "device", "fp16")

#: Modules that register the built-in backends, in the order they are listed to users.
BUILTIN_MODULES = ("mexit.runtime.backends", "mexit.runtime.tensorrt_backend", "mexit.runtime.torch_backend")

#: Deprecated option spellings still accepted by :func:`get_backend` (old name -> new name).
ALIASES = {"intra_op_threads": "threads", "device_id": "device"}


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its name, the class that implements it and what users are told about it."""

    name: str
    cls: type
    description: str
    extra: str | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """Every keyword option the backend's constructor takes (the common ones first)."""
        params = inspect.signature(self.cls.__init__).parameters.values()
        names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        return tuple([n for n in COMMON_OPTIONS if n in names] + [n for n in names if n not in COMMON_OPTIONS])

    @property
    def defaults(self) -> dict[str, Any]:
        """Default value of each option (used to coerce ``key=value`` strings from the command line)."""
        params = inspect.signature(self.cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def annotations(self) -> dict[str, str]:
        """Each option's type annotation as written (e.g. ``"bool | None"``): the type of an option whose
        default is None (``single_graph``), for coercing command-line strings."""
        params = inspect.signature(self.cls.__init__).parameters.values()
        return {p.name: str(p.annotation) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


_REGISTRY: dict[str, BackendSpec] = {}
_loaded = False


def register_backend(name: str, *, description: str, extra: str | None = None) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available as backend ``name``.

    The class must take ``(bundle, *, threads, device, fp16, **its own keyword-only options)`` and
    implement :class:`mexit.runtime.types.Backend`. It may define a static or class method
    ``validate_options(options: dict)`` (every option, defaults filled in) raising :class:`ConfigError` for
    option values it refuses whatever the bundle and machine (a GPU index on a CPU backend, an unknown
    provider): :func:`check_options` calls it, so ``mexit serve``, audit configs and :func:`get_backend` refuse
    them before loading anything.
    """

    def deco(cls: type) -> type:
        missing = [o for o in COMMON_OPTIONS if o not in inspect.signature(cls.__init__).parameters]
        if missing:
            raise TypeError(f"backend {name!r} ({cls.__name__}) must take the common options {missing}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.cls is not cls:
            raise ValueError(f"backend {name!r} is already registered by {existing.cls.__qualname__}")
        _REGISTRY[name] = BackendSpec(name=name, cls=cls, description=description, extra=extra)
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def backend_names() -> tuple[str, ...]:
    """Names of every registered backend, built-ins first."""
    _ensure_loaded()
    return tuple(_REGISTRY)


def backend_spec(name: str) -> BackendSpec:
    """The registered backend ``name``, or a :class:`ConfigError` listing the valid names."""
    _ensure_loaded()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(_REGISTRY)}")
    return spec


def describe_backends() -> str:
    """One line per backend (name, description, its own options), for ``--help`` texts."""
    _ensure_loaded()
    lines = []
    for spec in _REGISTRY.values():
        own = [o for o in spec.options if o not in COMMON_OPTIONS]
        extra = f" [mexit[{spec.extra}]]" if spec.extra else ""
        lines.append(f"{spec.name}: {spec.description}{extra}" + (f" (options: {', '.join(own)})" if own else ""))
    return "\n".join(lines)


def _resolve_aliases(name: str, opts: dict[str, Any], spec: BackendSpec) -> dict[str, Any]:
    out = dict(opts)
    for old, new in ALIASES.items():
        if old not in out or old in spec.options:
            continue
        value = out.pop(old)
        if new in out and out[new] not in (None, value):
            raise ConfigError(f"backend {name!r}: {old}={value!r} and {new}={out[new]!r} disagree; pass only {new}")
        warnings.warn(f"backend option {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=5)
        out[new] = value
    return out


def check_options(name: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Validate option names and the common options' values for backend ``name``; return them resolved."""
    spec = backend_spec(name)
    resolved = _resolve_aliases(name, dict(opts), spec)
    unknown = sorted(set(resolved) - set(spec.options))
    if unknown:
        bad = ", ".join(map(repr, unknown))
        raise ConfigError(f"backend {name!r} takes no option {bad}; its options are {', '.join(spec.options)}")
    threads = resolved.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    fp16 = resolved.get("fp16")
    if fp16 is not None and not isinstance(fp16, bool):
        raise ConfigError(f"fp16 must be true or false, got {fp16!r}")
    validate = getattr(spec.cls, "validate_options", None)
    if validate is not None:  # the backend's own rules that need no bundle, packages or device
        validate({**spec.defaults, **resolved})
    return resolved


def get_backend(name: str, bundle: Bundle | str | os.PathLike[str], **opts: Any) -> Backend:
    """Load ``bundle`` on the backend called ``name`` with its options (see the module docstring).

    Unknown names and options are :class:`ConfigError`; a backend whose packages or device are missing
    raises :class:`~mexit.errors.BackendUnavailableError` — never a silent fall-back to another one.
    """
    from mexit.bundle import load_bundle

    resolved = check_options(name, opts)
    return backend_spec(name).cls(load_bundle(bundle), **resolved)  # type: ignore[no-any-return]


def _coerce(name: str, key: str, raw: str, default: Any, annotation: str = "") -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null"):
        return None
    if key == "device":
        return int(text) if text.isdigit() else text
    if default is None:  # None means "auto": the annotation says what else the option takes
        kinds = {part.strip() for part in annotation.split("|")}
        default = False if "bool" in kinds else 0 if "int" in kinds else 0.0 if "float" in kinds else None
    if isinstance(default, bool) or key == "fp16":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"backend {name!r}: option {key} takes true/false, got {raw!r}")
    if isinstance(default, int) or key == "threads":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"backend {name!r}: option {key} takes an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"backend {name!r}: option {key} takes a number, got {raw!r}") from None
    return text


def parse_backend_options(name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["key=value", …]`` from a command line into typed options for backend ``name``.

    Values are coerced to the type of the option's default (bool, int, float, else string; ``none``
    gives None), so ``--backend-opt int8_heads=true --backend-opt provider=tensorrt`` just works.
    """
    spec = backend_spec(name)
    defaults, annotations = spec.defaults, spec.annotations
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"backend option must look like key=value, got {pair!r}")
        key = ALIASES.get(key, key) if key not in spec.options else key
        if key not in spec.options:
            raise ConfigError(f"backend {name!r} takes no option {key!r}; its options are {', '.join(spec.options)}")
        out[key] = _coerce(name, key, raw, defaults.get(key), annotations.get(key, ""))
    return out


def gpu_index(name: str, device: int | str | None, *, default: int = 0) -> int:
    """The CUDA device index a GPU backend should use: ``None`` -> ``default``; ``2``, ``"2"``, ``"cuda:2"``."""
    if device is None:
        return default
    if isinstance(device, bool):
        raise ConfigError(f"backend {name!r}: device must be a GPU index, got {device!r}")
    if isinstance(device, int):
        index = device
    else:
        text = str(device).strip().lower()
        text = text.removeprefix("cuda:") if text.startswith("cuda:") else ("0" if text == "cuda" else text)
        if not text.isdigit():
            raise ConfigError(f"backend {name!r} runs on a GPU: device must be a GPU index like 0, got {device!r}")
        index = int(text)
    if index < 0:
        raise ConfigError(f"backend {name!r}: device must be a GPU index >= 0, got {device!r}")
    return index


def refuse_gpu_options(name: str, device: int | str | None, fp16: bool, *, gpu_backends: str) -> None:
    """For CPU-only backends: a GPU index or ``fp16`` is a mistake, said in one line with the alternative."""
    if device is not None and str(device).strip().lower() != "cpu":
        raise ConfigError(f"backend {name!r} runs on the CPU; device={device!r} needs a GPU backend ({gpu_backends})")
    if fp16:
        raise ConfigError(f"backend {name!r} has no FP16 mode; fp16 applies to TensorRT engines (backend tensorrt)")
