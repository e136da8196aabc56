"""PyTorch backend: run the bundle's ``torch.export`` programs (``stage_k.pt2``) on CPU or CUDA.

Needs no training code: the programs are self-contained graphs saved by the exporter. ``torch`` is
imported when the backend is constructed, never when this module is imported, so the rest of
:mod:`mexit.runtime` keeps working on boxes without PyTorch.

Features stay torch tensors on the device between stages; compaction is ``index_select`` on the
device; only logits are copied to the host. ``cuda_graphs=True`` (CUDA only) captures one CUDA graph
per (stage, batch size) on first use and replays it afterwards, which removes most per-kernel launch
overhead at small batch sizes; graphs pin their input/output buffers, so calls are then serialised.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mexit.bundle import Bundle, load_bundle
from mexit.errors import BackendUnavailableError, BundleError, ConfigError

TORCH_HINT = "install PyTorch (`pip install mexit[train]`, or a CUDA build of torch for device='cuda')"


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(f"the torch backend needs PyTorch, which is not importable ({exc}); "
                                      f"{TORCH_HINT}") from exc
    return torch


class TorchBackend:
    """Chained ``torch.export`` programs on ``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``)."""

    name = "torch"
    max_batch: int | None = None

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        device: str = "cpu",
        cuda_graphs: bool = False,
        threads: int | None = None,
    ) -> None:
        torch = _import_torch()
        self._torch = torch
        self.bundle = load_bundle(bundle)
        programs = self.bundle.manifest.torch_programs
        if not programs or not programs.get("stages"):
            raise BundleError(
                f"bundle {self.bundle.path} has no torch.export programs; re-export it with save_torch_programs=True "
                "(the default) or use the onnxruntime backend"
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} requested but torch sees no CUDA GPU; {TORCH_HINT}")
        if cuda_graphs and self.device.type != "cuda":
            raise ConfigError("cuda_graphs=True needs device='cuda'")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.cuda_graphs = bool(cuda_graphs)
        self.thread_safe = not self.cuda_graphs
        self._stages = [self._load(rel) for rel in programs["stages"]]
        if len(self._stages) != self.bundle.num_exits:
            raise BundleError(f"bundle lists {len(self._stages)} torch programs for {self.bundle.num_exits} exits")
        full = programs.get("full")
        self._full = self._load(full) if full else None
        self._graphs: dict[tuple[int, int], tuple[Any, Any, Any]] = {}

    def _load(self, rel: str) -> Any:
        torch = self._torch
        program = torch.export.load(str(self.bundle.file(rel)))
        if self.device.type != "cpu":
            move = getattr(getattr(torch.export, "passes", None), "move_to_device_pass", None)
            if move is not None:
                program = move(program, self.device)
                return program.module()
            return program.module().to(self.device)
        return program.module()

    def _call(self, k: int, fn: Any, x: Any) -> Any:
        if not self.cuda_graphs:
            return fn(x)
        key = (k, int(x.shape[0]))
        entry = self._graphs.get(key)
        torch = self._torch
        if entry is None:
            static_in = x.clone()
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up outside capture (lazy init, cuDNN autotuning)
                    fn(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(static_in)
            entry = (graph, static_in, static_out)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _to_device(self, x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return self._torch.from_numpy(x).to(self.device, non_blocking=False)
        return x

    def run_stage(self, k: int, inputs: Any) -> tuple[Any | None, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
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
        with torch.inference_mode():
            index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.device)
            return features.index_select(0, index)

    def full(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            xt = self._to_device(x)
            if self._full is None:  # no full program saved: run the chain without exits
                h = xt
                for stage in self._stages:
                    out = stage(h)
                    h = out[0] if isinstance(out, tuple | list) and len(out) == 2 else out
                logits = h[0] if isinstance(h, tuple | list) else h
            else:
                logits = self._call(-1, self._full, xt)
            return logits.float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()
        self._stages = []
        self._full = None
