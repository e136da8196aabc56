"""PyTorch backend: run the bundle's ``torch.export`` programs (``stage_k.pt2``) on the CPU or a CUDA GPU.

Needs no training code: the programs are self-contained graphs saved by the exporter. ``torch`` is
imported when the backend is constructed, never when this module is imported, so the rest of
:mod:`mexit.runtime` keeps working on boxes without PyTorch.

Features stay torch tensors on the device between stages; compaction is ``index_select`` on the
device; only logits are copied to the host (the copy synchronises, so ``latency_ns`` is measured at
completion, not at kernel launch).

Options:

* ``device``: ``None``/``"cpu"`` (default) or a GPU (``0``, ``"1"``, ``"cuda"``, ``"cuda:1"``). Every call
  runs under ``torch.cuda.device(...)``, so server pool threads use the right GPU.
* ``threads``: ``torch.set_num_threads`` (process-wide in PyTorch: the last backend constructed wins).
* ``tf32=False``: TF32 convolutions/matmuls drift ~1e-3 from the CPU parity check and flip exits near the
  threshold, so they are off unless asked for (recalibrate the threshold when on). PyTorch keeps this
  setting process-wide; the backend sets it at construction.
* ``cuda_graphs=True`` (CUDA only): graphs are captured *at construction* for batch-size buckets
  1, 2, 4, … up to ``cuda_graph_max_batch`` (default 64) for every stage and the full graph, all in one
  shared memory pool. A batch of ``n`` rows replays the smallest bucket ``>= n`` (the extra rows are
  padding, ignored; rows are independent in eval mode), larger batches run eagerly. So the number of
  graphs and their memory are bounded, and no capture happens inside a timed call. Sharing a pool is
  safe because graphs replay one at a time (calls are serialised) and every output is consumed (copied
  into the next graph's static input, compacted or copied to the host) before the next replay.
* ``fp16`` is refused: the programs are FP32 graphs; FP16 is a TensorRT engine flavour.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

import numpy as np

from mexit.bundle import Bundle, load_bundle
from mexit.errors import BackendUnavailableError, BundleError, ConfigError
from mexit.runtime.registry import gpu_index, register_backend

TORCH_HINT = "install PyTorch (`pip install mexit[train]`, or a CUDA build of torch for a GPU device)"


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(f"the torch backend needs PyTorch, which is not importable ({exc}); "
                                      f"{TORCH_HINT}") from exc
    return torch


def buckets(max_batch: int) -> list[int]:
    """Batch-size buckets for CUDA graphs: powers of two below ``max_batch``, then ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(int(max_batch))
    return out


def set_tf32(torch: Any, enabled: bool) -> None:
    """Allow or forbid TF32 in cuDNN convolutions and CUDA matmuls (process-wide in PyTorch)."""
    precision = "tf32" if enabled else "ieee"
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:  # PyTorch >= 2.9: the fp32_precision API replaces the allow_tf32 flags
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
        return
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


@register_backend("torch", extra="train",
                  description="the bundle's torch.export programs with PyTorch, on the CPU or a CUDA GPU")
class TorchBackend:
    """Chained ``torch.export`` programs on the CPU or a CUDA GPU (see the module docstring for options)."""

    name = "torch"
    max_batch: int | None = None

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """fp16, a device that is neither ``cpu`` nor a GPU index, CUDA graphs on the CPU and a bad
        ``cuda_graph_max_batch`` are refused before PyTorch is imported."""
        if options.get("fp16"):
            raise ConfigError("backend 'torch' runs the FP32 torch.export programs; fp16 applies to backend tensorrt")
        device = options.get("device")
        on_cpu = device is None or str(device).strip().lower() == "cpu"
        if not on_cpu:
            gpu_index(cls.name, device)
        if options.get("cuda_graphs") and on_cpu:
            raise ConfigError("cuda_graphs=True needs a GPU device (device=0)")
        gmax = options["cuda_graph_max_batch"]
        if isinstance(gmax, bool) or not isinstance(gmax, int) or gmax < 1:
            raise ConfigError(f"cuda_graph_max_batch must be an integer >= 1, got {gmax!r}")

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        threads: int | None = None,
        device: int | str | None = None,
        fp16: bool = False,
        cuda_graphs: bool = False,
        cuda_graph_max_batch: int = 64,
        tf32: bool = False,
    ) -> None:
        self.validate_options({"device": device, "fp16": fp16, "cuda_graphs": cuda_graphs,
                               "cuda_graph_max_batch": cuda_graph_max_batch})
        torch = _import_torch()
        self._torch = torch
        self.bundle = load_bundle(bundle)
        programs = self.bundle.manifest.torch_programs
        if not programs or not programs.get("stages"):
            raise BundleError(
                f"bundle {self.bundle.path} has no torch.export programs; re-export it with save_torch_programs=True "
                "(the default) or use the onnxruntime backend"
            )
        text = "cpu" if device is None else str(device).strip().lower()
        if text == "cpu":
            self.device = torch.device("cpu")
        else:
            index = gpu_index(self.name, device)
            if not torch.cuda.is_available():
                raise BackendUnavailableError(f"device {device!r} requested but torch {torch.__version__} sees no "
                                              f"CUDA GPU; {TORCH_HINT}")
            count = torch.cuda.device_count()
            if index >= count:
                raise BackendUnavailableError(f"there is no GPU {index} here (torch sees {count}); "
                                              f"pick device 0..{count - 1}")
            self.device = torch.device("cuda", index)
        cuda = self.device.type == "cuda"
        if threads is not None:
            torch.set_num_threads(int(threads))
        if cuda:
            set_tf32(torch, bool(tf32))
        self.tf32 = bool(tf32) and cuda
        self.cuda_graphs = bool(cuda_graphs)
        self.thread_safe = not self.cuda_graphs
        self._stages = [self._load(rel) for rel in programs["stages"]]
        if len(self._stages) != self.bundle.num_exits:
            raise BundleError(f"bundle lists {len(self._stages)} torch programs for {self.bundle.num_exits} exits")
        full = programs.get("full")
        self._full = self._load(full) if full else None
        self._graphs: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        self._buckets = buckets(cuda_graph_max_batch) if self.cuda_graphs else []
        if self.cuda_graphs:
            self._capture_all()

    def _device_ctx(self) -> Any:
        if self.device.type == "cuda":
            return self._torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _load(self, rel: str) -> Any:
        torch = self._torch
        program = torch.export.load(str(self.bundle.file(rel)))
        if self.device.type != "cpu":
            try:  # a submodule: getattr(torch.export, "passes") is None until it is imported
                move = importlib.import_module("torch.export.passes").move_to_device_pass
            except (ImportError, AttributeError):
                move = None
            if move is not None:
                return move(program, self.device).module()
            return program.module().to(self.device)
        return program.module()

    # --- CUDA graphs -------------------------------------------------------------------------------
    def _input_shapes(self) -> list[tuple[int, tuple[int, ...]]]:
        m = self.bundle.manifest
        shapes = [(0, tuple(m.input.sample_shape))]
        for e in m.exits[1:]:
            prev = m.exits[e.index - 1].feature_shape
            if prev is None:
                raise BundleError(f"manifest.exits[{e.index - 1}].feature_shape is missing; re-export the bundle")
            shapes.append((e.index, tuple(prev)))
        if self._full is not None:
            shapes.append((-1, tuple(m.input.sample_shape)))
        return shapes

    def _capture_all(self) -> None:
        """Capture one graph per (stage, bucket) now, in one shared pool (see the module docstring)."""
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        with self._device_ctx(), torch.inference_mode():
            for k, shape in self._input_shapes():
                fn = self._full if k == -1 else self._stages[k]
                for b in self._buckets:
                    static_in = torch.zeros((b, *shape), dtype=torch.float32, device=self.device)
                    side = torch.cuda.Stream(device=self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        for _ in range(2):  # warm up outside capture (lazy init, cuDNN autotuning)
                            fn(static_in)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        static_out = fn(static_in)
                    self._graphs[(k, b)] = (graph, static_in, static_out)
            torch.cuda.synchronize(self.device)

    @property
    def graph_count(self) -> int:
        """CUDA graphs held (bounded: stages x buckets)."""
        return len(self._graphs)

    def _call(self, k: int, fn: Any, x: Any) -> Any:
        n = int(x.shape[0])
        if not self.cuda_graphs or n > self._buckets[-1]:
            return fn(x)
        b = next(b for b in self._buckets if b >= n)
        graph, static_in, static_out = self._graphs[(k, b)]
        static_in[:n].copy_(x)
        graph.replay()
        if isinstance(static_out, tuple | list):
            return type(static_out)(t[:n] for t in static_out)
        return static_out[:n]

    def _to_device(self, x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return self._torch.from_numpy(x).to(self.device, non_blocking=False)
        return x

    # --- Backend protocol --------------------------------------------------------------------------
    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        torch = self._torch
        with self._device_ctx(), torch.inference_mode():
            out = self._call(k, self._stages[k], self._to_device(inputs))
            if isinstance(out, tuple | list):
                if len(out) == 2:
                    features, logits = out
                else:
                    features, logits = None, out[0]
            else:
                features, logits = None, out
            return features, logits.float().cpu().numpy()

    def take(self, features: Any, idx: np.ndarray) -> Any:
        torch = self._torch
        with self._device_ctx(), torch.inference_mode():
            index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.device)
            return features.index_select(0, index)

    def full(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with self._device_ctx(), torch.inference_mode():
            xt = self._to_device(x)
            if self._full is None:  # no full program saved: run the chain without exits
                h = xt
                for k, stage in enumerate(self._stages):
                    out = self._call(k, stage, h)
                    h = out[0] if isinstance(out, tuple | list) and len(out) == 2 else out
                logits = h[0] if isinstance(h, tuple | list) else h
            else:
                logits = self._call(-1, self._full, xt)
            return logits.float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()
        self._stages = []
        self._full = None
