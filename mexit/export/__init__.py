"""Export: per-exit ONNX stages, a full-depth graph, parity checks, the bundle writer and TensorRT engines.

Imports torch (and onnx); the runtime that reads the bundles does not.
"""

from mexit.export.exporter import export_bundle

__all__ = ["export_bundle"]
