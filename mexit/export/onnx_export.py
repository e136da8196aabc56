"""Export one module to an ONNX file with a dynamic batch axis (and optionally a torch.export program).

Two exporters, as the torch 2.x landscape requires (see shared/reference/early-exit-deployment.md §3.1):

* ``dynamo`` (torch's default since 2.9): ``torch.export.export`` with ``Dim("batch")`` on an example
  batch of at least 2 (older torch.export specialises sizes 0/1), then ``torch.onnx.export`` of that
  ``ExportedProgram``. The same program is what :func:`torch.export.save` stores for the PyTorch
  backend, so we trace once and use it twice.
* ``legacy`` (TorchScript-based, ``dynamo=False``): deprecated but fast and independent of onnxscript.

``auto`` tries dynamo and falls back to legacy with a warning. Either way the file is post-processed
so that axis 0 of every graph input and output is the symbolic dim ``batch`` (the dynamo path names it
``s0``-style), checked to really be dynamic, and validated with ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from mexit.errors import ConfigError
from mexit.export.fold import fold_linear_batchnorm

log = logging.getLogger(__name__)
# The dynamo exporter warns once per missing torchvision op ("torchvision is not installed. Skipping
# torchvision::nms"): irrelevant for our models and alarming to users, so keep that logger quiet.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

EXPORTERS = ("auto", "dynamo", "legacy")
LEGACY_OPSET = 17
BATCH_DIM = "batch"


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced: the exporter that worked, the opset, and the traced program."""

    exporter: str
    opset: int
    program: Any | None  # torch.export.ExportedProgram, when one could be traced


def trace_program(module: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` ``module`` with a dynamic batch axis (raises whatever torch.export raises)."""
    batch = torch.export.Dim(BATCH_DIM)
    with quiet_torch_deprecations():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)


@contextlib.contextmanager
def quiet_torch_deprecations() -> Iterator[None]:
    """Hide torch's internal pytree deprecation notice (raised inside torch.export; not actionable here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_names: list[str],
    exporter: str = "auto",
    opset: int | None = None,
    want_program: bool = False,
    fold_batchnorm: bool = True,
) -> ExportResult:
    """Export ``module`` (in eval mode) to ``path`` with ``input_name -> output_names`` and a dynamic batch;
    ``Linear → BatchNorm1d`` pairs are folded first (:mod:`mexit.export.fold`, on a copy)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if example.shape[0] < 2:
        raise ValueError("the export example needs a batch of at least 2 so that the batch axis stays symbolic")
    module.eval()
    module, folded = fold_linear_batchnorm(module) if fold_batchnorm else (module, 0)
    if folded:
        log.debug("folded %d Linear → BatchNorm1d pairs of %s", folded, path.name)
    program = None
    program_error: Exception | None = None
    if exporter != "legacy" or want_program:
        try:
            program = trace_program(module, example)
        except Exception as exc:  # torch.export rejects many Python patterns; the legacy path may still work
            program_error = exc
            log.warning("torch.export failed for %s: %s", path.name, _short(exc))
    used = None
    if exporter in ("auto", "dynamo"):
        try:
            if program is None:
                raise RuntimeError(f"torch.export failed: {_short(program_error)}")
            _export_dynamo(program, example, path, input_name, output_names, opset)
            model_opset = finalize_onnx(path, input_name=input_name, output_names=output_names)
            used = "dynamo"
        except Exception as exc:
            if exporter == "dynamo":
                raise
            log.warning("dynamo ONNX export of %s failed (%s); falling back to the legacy exporter", path.name,
                        _short(exc))
    if used is None:
        path.unlink(missing_ok=True)
        _export_legacy(module, example, path, input_name, output_names, opset)
        model_opset = finalize_onnx(path, input_name=input_name, output_names=output_names)
        used = "legacy"
    return ExportResult(exporter=used, opset=model_opset, program=program)


def _export_dynamo(program: Any, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
                   opset: int | None) -> None:
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with quiet_torch_deprecations():
        onnx_program = torch.onnx.export(
            program,
        (example,),
        input_names=[input_name],
        output_names=output_names,
        dynamo=True,
        verbose=False,
        report=False,
        **kwargs,
    )
    onnx_program.save(str(path))


def _export_legacy(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str],
                   opset: int | None) -> None:
    names = [input_name, *output_names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: we know, it is the fallback
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset or LEGACY_OPSET,
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes={n: {0: BATCH_DIM} for n in names},
            do_constant_folding=True,
        )


def finalize_onnx(path: Path, *, input_name: str, output_names: list[str]) -> int:
    """Name axis 0 ``batch`` everywhere, insist it is symbolic, check the model; return its opset."""
    model = onnx.load(str(path))
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    got_in = [i.name for i in graph_inputs]
    got_out = [o.name for o in model.graph.output]
    if got_in != [input_name] or got_out != output_names:
        raise RuntimeError(
            f"{path.name}: exported I/O {got_in} -> {got_out}, expected [{input_name}] -> {output_names}"
        )
    for value in [*graph_inputs, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise RuntimeError(f"{path.name}: {value.name} has no shape information")
        if dims[0].HasField("dim_value"):
            raise RuntimeError(f"{path.name}: the batch axis of {value.name} was fixed to {dims[0].dim_value}")
        dims[0].dim_param = BATCH_DIM
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


def _short(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    return text.splitlines()[0][:300] if text else text
