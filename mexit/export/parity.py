"""Numerical parity between the exported ONNX graphs (run by ONNX Runtime) and the PyTorch model.

The export is only as good as its agreement with the trained model on *real* inputs: a graph that
drifts (eval/train-mode mix-ups, an op exported with different semantics, a batch axis baked in)
would change which exit a sample leaves at, and with it every accuracy, latency and privacy number
measured downstream. The chain is therefore run exactly as the runtime runs it (stage by stage,
features fed forward) at batch 1 and at batch n.

This module uses onnxruntime directly rather than :mod:`mexit.runtime`: export sits before the runtime
in the pipeline and must not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mexit.bundle import ParityReport
from mexit.errors import BundleError

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class StageIO:
    path: Path
    input_name: str
    feature_output: str | None
    logits_output: str


def _session(path: Path) -> ort.InferenceSession:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError('the ONNX parity check needs ONNX Runtime: pip install "mexit[cpu]" (or "mexit[gpu]" on '
                          "an NVIDIA GPU machine)") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_chain(sessions: Sequence[ort.InferenceSession], stages: Sequence[StageIO], x: np.ndarray) -> list[np.ndarray]:
    """Per-exit logits of the chained stages for the whole batch ``x`` (every sample runs every stage)."""
    out: list[np.ndarray] = []
    h = x
    for sess, io in zip(sessions, stages, strict=True):
        names = [io.logits_output] if io.feature_output is None else [io.feature_output, io.logits_output]
        res = sess.run(names, {io.input_name: h})
        if io.feature_output is not None:
            h = res[0]
        out.append(np.asarray(res[-1]))
    return out


def check_parity(
    stages: Sequence[StageIO],
    full_path: Path,
    sample_inputs: np.ndarray,
    reference: Sequence[np.ndarray],
    *,
    tolerance: float,
    input_name: str,
    full_output: str,
) -> ParityReport:
    """Compare chained stages and the full graph with PyTorch's per-exit logits ``reference``.

    Raises :class:`BundleError` with the numbers when any exit is off by more than
    ``tolerance * max(1, |logits|)`` (absolute for logits of order 1, relative for large ones).
    """
    sessions = [_session(s.path) for s in stages]
    full = _session(full_path)
    n = len(sample_inputs)
    k_exits = len(stages)
    diffs = np.zeros(k_exits)
    full_diff = 0.0
    batch_sizes = [1] if n == 1 else [1, n]
    # batch n
    if n > 1:
        outs = run_chain(sessions, stages, sample_inputs)
        for k in range(k_exits):
            diffs[k] = max(diffs[k], float(np.max(np.abs(outs[k] - reference[k]))))
        full_out = full.run([full_output], {input_name: sample_inputs})[0]
        full_diff = max(full_diff, float(np.max(np.abs(full_out - reference[-1]))))
    # batch 1, sample by sample
    for i in range(n):
        xi = sample_inputs[i : i + 1]
        outs = run_chain(sessions, stages, xi)
        for k in range(k_exits):
            diffs[k] = max(diffs[k], float(np.max(np.abs(outs[k] - reference[k][i : i + 1]))))
        full_out = full.run([full_output], {input_name: xi})[0]
        full_diff = max(full_diff, float(np.max(np.abs(full_out - reference[-1][i : i + 1]))))
    scales = [float(np.max(np.abs(r))) for r in reference]
    bad = [k for k in range(k_exits) if not diffs[k] <= tolerance * max(1.0, scales[k])]
    if bad:
        detail = ", ".join(f"exit {k}: {diffs[k]:.3g} (allowed {tolerance * max(1.0, scales[k]):.3g})" for k in bad)
        raise BundleError(
            f"export parity check failed on {n} samples at batch sizes {batch_sizes}: {detail}; nothing was "
            "written. Look for layers that behave differently once exported, or raise --tolerance if the drift "
            "is acceptable"
        )
    if not full_diff <= tolerance * max(1.0, scales[-1]):
        raise BundleError(
            f"export parity check failed: full.onnx differs from the final exit by {full_diff:.3g} "
            f"(allowed {tolerance * max(1.0, scales[-1]):.3g}); nothing was written"
        )
    return ParityReport(
        max_abs_diff=tuple(float(d) for d in diffs),
        full_max_abs_diff=float(full_diff),
        batch_sizes=tuple(batch_sizes),
        tolerance=float(tolerance),
        samples=int(n),
        logit_scale=tuple(scales),
    )
