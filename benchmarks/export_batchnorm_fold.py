"""What folding ``Linear → BatchNorm1d`` before export saves at inference (``mexit.export.fold``).

Exports one training run twice — folded (the default) and as trained (``fold_batchnorm=False``) — with the
chosen exporter, then times a chain of ``session.run`` over all stages of each bundle (ONNX Runtime CPU, one
thread, spinning off) at batch 1 and 64, the two bundles interleaved round by round; medians. The dynamo
exporter's optimiser already folds these pairs, so the comparison is for ``--exporter legacy`` (default)::

    python benchmarks/export_batchnorm_fold.py --run /tmp/a2/t     # → benchmarks/results/export_batchnorm_fold.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from runtime_latency import bare_loop  # a sibling script, importable once its folder is on sys.path

from mexit._io import atomic_write_json, provenance
from mexit.bundle import load_bundle
from mexit.export import export_bundle
from mexit.runtime.backends import session_options
from mexit.train.runner import load_run

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "export_batchnorm_fold.json"


def _ops(bundle: Path) -> dict[str, int]:
    b = load_bundle(bundle)
    c: collections.Counter[str] = collections.Counter()
    for k in range(b.manifest.model.num_exits):
        c.update(node.op_type for node in onnx.load(str(b.stage_path(k))).graph.node)
    return dict(sorted(c.items()))


def _chain(bare: tuple[list[ort.InferenceSession], list[list[str]], list[str]], x: np.ndarray) -> int:
    """Nanoseconds for one pass of ``x`` through every stage (:func:`runtime_latency.bare_loop`'s sessions)."""
    sessions, outputs, inputs = bare
    t0 = time.perf_counter_ns()
    h = x
    for sess, out, name in zip(sessions, outputs, inputs, strict=True):
        h = sess.run(out, {name: h})[0]
    return time.perf_counter_ns() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="training run directory (mexit train)")
    ap.add_argument("--exporter", choices=["legacy", "dynamo", "auto"], default="legacy")
    ap.add_argument("--rounds", type=int, default=400, help="interleaved rounds at batch 1 (a quarter at 64)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    run = load_run(args.run)
    x_all = run.dataset.inputs(run.splits.target_val[:64])
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for name, fold in (("folded", True), ("as_trained", False)):
            bundles[name] = export_bundle(run.model, Path(tmp) / name, sample_inputs=x_all[:32], threshold=0.9,
                                          dataset_name=run.dataset.name, dataset_kind=run.dataset.kind,
                                          exporter=args.exporter, save_torch_programs=False, fold_batchnorm=fold)
        sessions = {k: bare_loop(v, session_options(threads=1)) for k, v in bundles.items()}
        result: dict[str, Any] = {"benchmark": "export_batchnorm_fold", "run": str(args.run),
                                  "exporter": args.exporter, "ops": {k: _ops(v) for k, v in bundles.items()},
                                  "load_average_before": os.getloadavg()[0]}
        for batch in (1, 64):
            x = np.ascontiguousarray(x_all[:batch], dtype=np.float32)
            times: dict[str, list[int]] = {k: [] for k in sessions}
            for r in range(args.rounds if batch == 1 else max(args.rounds // 4, 1)):
                for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                    times[k].append(_chain(sessions[k], x))
            med = {k: float(np.median(v)) / 1e3 for k, v in times.items()}
            result[f"batch{batch}"] = {"median_us": med, "folded_over_as_trained": med["folded"] / med["as_trained"]}
    result["load_average_after"] = os.getloadavg()[0]
    result["provenance"] = provenance(seed=0)
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k.startswith("batch")}, indent=1))


if __name__ == "__main__":
    main()
