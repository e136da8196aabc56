"""``export_bundle``: turn a trained :class:`MultiExitNet` into a verified deployment bundle.

One ONNX graph per stage (so the runtime can stop after any exit and compact the batch per sample),
one full-depth graph for the vanilla baseline, optional ``torch.export`` programs for a PyTorch
backend, a parity check against PyTorch on real inputs, and a manifest with sha256 of every file.
Everything is built in a hidden staging directory and published by one rename at the end, so a
failed export (parity, a crash, Ctrl-C) leaves nothing that :func:`mexit.bundle.load_bundle` accepts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mexit._io import provenance
from mexit.bundle import (
    DATASET_KINDS,
    FORMAT_VERSION,
    FULL_OUTPUT_NAME,
    INPUT_NAME,
    POLICIES,
    DatasetInfo,
    ExitEntry,
    InputSpec,
    Manifest,
    ModelInfo,
    PolicySpec,
    check_target,
    feature_name,
    file_entry,
    logits_name,
    stage_file_name,
    staged_bundle_dir,
    write_manifest,
)
from mexit.errors import ConfigError, InputError
from mexit.export.onnx_export import EXPORTERS, export_onnx, quiet_torch_deprecations
from mexit.export.parity import StageIO, check_parity
from mexit.export.wrappers import FullExport, StageExport
from mexit.train.multiexit import MultiExitNet

log = logging.getLogger(__name__)

FULL_FILE = "full.onnx"


def export_bundle(
    model: MultiExitNet,
    out_dir: str | os.PathLike[str],
    *,
    sample_inputs: np.ndarray,
    threshold: float,
    policy: str = "max_prob",
    dataset_name: str,
    dataset_kind: str,
    class_names: Sequence[str] | None = None,
    opset: int | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    save_torch_programs: bool = True,
    exporter: str = "auto",
    value_range: tuple[float, float] | None = None,
    provenance_extra: Mapping[str, Any] | None = None,
    fold_batchnorm: bool = True,
) -> Path:
    """Export ``model`` to a bundle directory ``out_dir`` and return its path.

    ``sample_inputs`` (n, *input_shape) are real model inputs (images in [0, 1], tabular rows as-is; a
    few dozen) used as export examples and for the parity check at batch 1 and batch n. ``threshold``
    and ``policy`` become the bundle's default exit rule. ``exporter`` is ``auto`` (dynamo, falling
    back to the legacy exporter), ``dynamo`` or ``legacy``. ``value_range`` documents the expected input
    range (default [0, 1] for images, none for tabular data). ``fold_batchnorm``: fold ``Linear →
    BatchNorm1d`` pairs before tracing (:mod:`mexit.export.fold`; off: the graph as trained, for comparison).
    Raises :class:`BundleError` when parity fails or ``out_dir`` exists without ``overwrite``; nothing is left
    behind on failure.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown exit policy {policy!r}; use one of {', '.join(POLICIES)}")
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    if dataset_kind not in DATASET_KINDS:
        raise ConfigError(f"dataset_kind must be one of {', '.join(DATASET_KINDS)}, got {dataset_kind!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if not tolerance > 0:
        raise ConfigError(f"tolerance must be positive, got {tolerance!r}")
    if class_names is not None and len(class_names) != model.num_classes:
        raise ConfigError(f"{len(class_names)} class names given for a model with {model.num_classes} classes")
    x = _check_samples(sample_inputs, tuple(model.input_shape))
    check_target(out_dir, overwrite=overwrite)

    net = copy.deepcopy(model).to("cpu").eval()
    k_exits = net.num_exits
    costs, runtime_costs = net.costs(), net.runtime_costs()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        reference = [t.numpy() for t in net(xt)]
        # Example batch >= 2 keeps torch.export's batch dim symbolic; real activations, not zeros.
        examples = [xt if len(xt) >= 2 else xt.repeat(2, *([1] * (xt.dim() - 1)))]
        for stage in net.stages[:-1]:
            examples.append(stage(examples[-1]))
    if value_range is None and dataset_kind == "image":
        value_range = (0.0, 1.0)

    with staged_bundle_dir(out_dir, overwrite=overwrite) as root:
        used: list[str] = []
        opsets: set[int] = set()
        programs: list[Any | None] = []
        stage_io: list[StageIO] = []
        exits: list[ExitEntry] = []
        for k in range(k_exits):
            last = k == k_exits - 1
            in_name = INPUT_NAME if k == 0 else feature_name(k - 1)
            outputs = [logits_name(k)] if last else [feature_name(k), logits_name(k)]
            wrapper = StageExport(net.stages[k], net.heads[k], last=last).eval()
            rel = stage_file_name(k)
            res = export_onnx(wrapper, examples[k], root / rel, input_name=in_name, output_names=outputs,
                              exporter=exporter, opset=opset, want_program=save_torch_programs,
                              fold_batchnorm=fold_batchnorm)
            used.append(res.exporter)
            opsets.add(res.opset)
            programs.append(res.program)
            stage_io.append(StageIO(root / rel, in_name, None if last else feature_name(k), logits_name(k)))
            feature_shape = None if last else tuple(int(d) for d in examples[k + 1].shape[1:])
            exits.append(ExitEntry(
                index=k,
                stage_file=rel,
                sha256=file_entry(root, rel).sha256,
                input_name=in_name,
                feature_output=None if last else feature_name(k),
                logits_output=logits_name(k),
                cumulative_flops=int(costs[k]),
                runtime_flops=int(runtime_costs[k]),
                feature_shape=feature_shape,
            ))
            log.info("exported stage %d/%d (%s exporter)", k + 1, k_exits, res.exporter)
        full = FullExport(net).eval()
        res = export_onnx(full, examples[0], root / FULL_FILE, input_name=INPUT_NAME, output_names=[FULL_OUTPUT_NAME],
                          exporter=exporter, opset=opset, want_program=save_torch_programs,
                          fold_batchnorm=fold_batchnorm)
        used.append(res.exporter)
        opsets.add(res.opset)

        parity = check_parity(stage_io, root / FULL_FILE, x, reference, tolerance=tolerance,
                              input_name=INPUT_NAME, full_output=FULL_OUTPUT_NAME)
        log.info("parity: max |ONNX - torch| per exit %s", [f"{d:.2e}" for d in parity.max_abs_diff])

        extra_files: dict[str, str] = {}
        torch_programs = None
        if save_torch_programs:
            torch_programs = _save_programs(root, [*programs, res.program], extra_files)

        manifest = Manifest(
            format_version=FORMAT_VERSION,
            provenance=provenance(
                exporters=sorted(set(used)),
                opset=sorted(opsets),
                batchnorm_folded=bool(fold_batchnorm),
                **dict(provenance_extra or {}),
            ),
            model=ModelInfo(
                arch=str(net.arch),
                num_exits=k_exits,
                num_classes=int(net.num_classes),
                class_names=tuple(str(c) for c in class_names) if class_names is not None else None,
            ),
            dataset=DatasetInfo(name=dataset_name, kind=dataset_kind),
            input=InputSpec(
                name=INPUT_NAME,
                shape=(-1, *(int(d) for d in net.input_shape)),
                dtype="float32",
                value_range=value_range,
                note=(
                    "normalisation is folded into stage 0: feed images as float32 in value_range (uint8 images "
                    "are scaled by 1/255 by the runtime), tabular rows as they are"
                ),
            ),
            exits=tuple(exits),
            full_model=file_entry(root, FULL_FILE),
            policy=PolicySpec(kind=policy, threshold=float(threshold)),
            parity=parity,
            extra_files=extra_files,
            torch_programs=torch_programs,
        )
        write_manifest(root, manifest)
    return Path(out_dir)


def _check_samples(sample_inputs: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(sample_inputs, np.ndarray):
        raise InputError(f"sample_inputs must be a numpy array of shape (n, {', '.join(map(str, input_shape))}), "
                         f"got {type(sample_inputs).__name__}")
    if sample_inputs.ndim != len(input_shape) + 1 or tuple(sample_inputs.shape[1:]) != input_shape:
        raise InputError(f"sample_inputs must have shape (n, {', '.join(map(str, input_shape))}), "
                         f"got {tuple(sample_inputs.shape)}")
    if len(sample_inputs) == 0:
        raise InputError("sample_inputs is empty; pass a few dozen real inputs for the parity check")
    if sample_inputs.dtype.kind not in "fiu":
        raise InputError(f"sample_inputs must be real numbers, got dtype {sample_inputs.dtype}")
    x = np.ascontiguousarray(sample_inputs, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError("sample_inputs contains NaN or infinite values")
    return x


def _save_programs(root: Path, programs: list[Any | None], extra_files: dict[str, str]) -> dict[str, Any] | None:
    """Save the traced stage programs (and the full one) for the PyTorch backend; skip, with a warning,
    when any stage could not be traced (a partial set would be useless to that backend)."""
    stage_programs, full_program = programs[:-1], programs[-1]
    if any(p is None for p in stage_programs):
        log.warning("torch.export failed for at least one stage; the bundle will have no PyTorch programs")
        return None
    stages: list[str] = []
    try:
        with quiet_torch_deprecations():
            for k, program in enumerate(stage_programs):
                rel = f"stage_{k}.pt2"
                torch.export.save(program, str(root / rel))
                stages.append(rel)
            full_rel = None
            if full_program is not None:
                full_rel = "full.pt2"
                torch.export.save(full_program, str(root / full_rel))
    except Exception as exc:  # saving is optional: never fail the ONNX bundle because of it
        log.warning("could not save torch.export programs (%s); the bundle will have none", exc)
        for rel in [*stages, "full.pt2"]:
            (root / rel).unlink(missing_ok=True)
        return None
    for rel in [*stages, *([full_rel] if full_rel else [])]:
        extra_files[rel] = file_entry(root, rel).sha256
    return {"stages": stages, "full": full_rel}
