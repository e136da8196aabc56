"""The early-exit runtime: bundle reader, chained executor and execution backends.

Needs numpy and onnxruntime only; TensorRT and PyTorch are imported inside their optional backends,
never at module level, so this package runs on edge boxes without them.
"""

from mexit.bundle import Bundle, load_bundle
from mexit.runtime.backends import BACKENDS, Backend, OrtCpuBackend, OrtGpuBackend, get_backend
from mexit.runtime.chained import EarlyExitRuntime, validate_inputs
from mexit.runtime.policy import ExitPolicy, normalized_entropy, softmax
from mexit.runtime.types import Prediction, Runtime

__all__ = [
    "BACKENDS",
    "Backend",
    "Bundle",
    "EarlyExitRuntime",
    "ExitPolicy",
    "OrtCpuBackend",
    "OrtGpuBackend",
    "Prediction",
    "Runtime",
    "get_backend",
    "load_bundle",
    "normalized_entropy",
    "softmax",
    "validate_inputs",
]
