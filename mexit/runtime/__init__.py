"""The early-exit runtime: bundle reader, chained executor and execution backends.

Needs numpy and one ONNX Runtime build (``mexit[cpu]`` or ``mexit[gpu]``) for its default backends;
TensorRT and PyTorch are imported inside their optional backends, never at module level, so this
package runs on edge boxes without them (and imports even without ONNX Runtime, for those backends).

Backends come from one registry (:mod:`mexit.runtime.registry`): :func:`backend_names` lists them,
:func:`describe_backends` gives a line per backend for ``--help``, :func:`parse_backend_options` turns
``key=value`` strings into typed options, and ``EarlyExitRuntime(bundle, backend=NAME, threads=…,
device=…, fp16=…, **own_options)`` loads one.
"""

from mexit.bundle import Bundle, load_bundle
from mexit.runtime.backends import Backend, OrtCpuBackend, OrtGpuBackend
from mexit.runtime.chained import EarlyExitRuntime, validate_inputs
from mexit.runtime.policy import ExitPolicy, normalized_entropy, softmax
from mexit.runtime.registry import (
    COMMON_OPTIONS,
    BackendSpec,
    backend_names,
    backend_spec,
    check_options,
    describe_backends,
    get_backend,
    parse_backend_options,
    register_backend,
)
from mexit.runtime.types import Prediction, Runtime

#: Names of the registered backends (derived from the registry at import time; prefer backend_names()).
BACKENDS = backend_names()

__all__ = [
    "BACKENDS",
    "COMMON_OPTIONS",
    "Backend",
    "BackendSpec",
    "Bundle",
    "EarlyExitRuntime",
    "ExitPolicy",
    "OrtCpuBackend",
    "OrtGpuBackend",
    "Prediction",
    "Runtime",
    "backend_names",
    "backend_spec",
    "check_options",
    "describe_backends",
    "get_backend",
    "load_bundle",
    "normalized_entropy",
    "parse_backend_options",
    "register_backend",
    "softmax",
    "validate_inputs",
]
