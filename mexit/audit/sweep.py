"""Sweeps: many independent audits (datasets × architectures × exit counts × seeds), one comparison table.

A grid file is TOML::

    base_config = "audit.toml"        # optional: a base audit config file (relative to the grid file)
    set = ["target.epochs=5"]         # optional: overrides applied to every run
    [base]                            # optional: base config keys inline (applied after base_config)
    deployment = { mode = "in-process" }
    [grid]
    datasets = ["digits", "location"] # dataset.name
    archs = ["fcn18-1"]               # target.arch
    exits = [2, 4]                    # target.exits
    seeds = [0, 1]                    # seed
    [data_roots]                      # optional: dataset name -> data root
    location = "../shared/data/location"

Every combination is validated before anything runs. Each audit is one task — ``run_audit`` into
``OUT/runs/<dataset>-<arch>-x<exits>-s<seed>`` — executed by a local process pool (default) or by Ray
(``executor="ray"``). With Ray, ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) joins a
running cluster — every node then needs mexit installed and ``OUT`` on a shared filesystem, since each
task writes its run where it executes — and without one the sweep starts a private local instance with
``workers × threads`` CPUs and shuts it down afterwards. Each task asks Ray for ``threads`` CPUs, and at
most ``workers`` tasks are in flight on either executor. Audits are cached like single runs, so re-running
a sweep only does what is missing. Results are aggregated into ``sweep.json``, ``sweep.csv`` and
``sweep.md``. A failing audit (an error, a crash, a worker that died) is reported in its row and does not
stop the others.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mexit._io import atomic_write_bytes, atomic_write_json, provenance
from mexit.audit.config import AuditConfig, apply_overrides, make_audit_config, read_config_file
from mexit.audit.executors import _local_map, _ray_map
from mexit.errors import ConfigError, UserError

log = logging.getLogger(__name__)

SWEEP_SCHEMA = "mexit.sweep/1"
#: Seconds to wait for a TCP answer from a cluster address before giving up (ray.init itself retries ~15 min).


class _Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(default_factory=list)
    archs: list[str] = Field(default_factory=list)
    exits: list[int] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)


class _GridFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_config: str | None = None
    set: list[str] = Field(default_factory=list)
    base: dict[str, Any] = Field(default_factory=dict)
    grid: _Grid = Field(default_factory=_Grid)
    data_roots: dict[str, str] = Field(default_factory=dict)


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def plan_sweep(grid_file: str | Path) -> list[tuple[str, AuditConfig]]:
    """The (run name, validated config) of every combination of the grid file."""
    path = Path(grid_file)
    raw = read_config_file(path)
    try:
        spec = _GridFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else f"invalid key ({err['msg']}):"
        raise ConfigError(f"grid file {path}: {what} {key}") from None
    base: dict[str, Any] = {}
    if spec.base_config:
        base = read_config_file((path.parent / spec.base_config).expanduser())
    base = _merge(base, spec.base)
    base = apply_overrides(base, spec.set)
    defaults = make_audit_config(base)
    g = spec.grid
    datasets = g.datasets or [defaults.dataset.name]
    archs = g.archs or [defaults.target.arch]
    exits = g.exits or [defaults.target.exits]
    seeds = g.seeds or [defaults.seed]
    plan = []
    for ds, arch, k, seed in itertools.product(datasets, archs, exits, seeds):
        doc = _merge(base, {"dataset": {"name": ds}, "target": {"arch": arch, "exits": k}, "seed": seed})
        if ds in spec.data_roots:
            root = Path(spec.data_roots[ds]).expanduser()
            doc["dataset"]["data_root"] = str(root if root.is_absolute() else (path.parent / root).resolve())
        name = f"{ds}-{arch}-x{k}-s{seed}"
        try:
            plan.append((name, make_audit_config(doc)))
        except ConfigError as exc:
            raise ConfigError(f"grid run {name}: {exc}") from None
    names = [n for n, _ in plan]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid file {path} lists a value twice; every run needs its own combination")
    return plan


def run_one(config: dict[str, Any], run_dir: str, threads: int | None = None, report: bool = True) -> dict[str, Any]:
    """One sweep task: run the audit (no progress bars) and return its row. Top-level for pickling.

    ``report=False`` skips the run's report.html (its figures take most of a tiny audit's time); ``mexit
    report RUN_DIR`` builds it later from the cached results.
    """
    from mexit.audit.pipeline import run_audit

    limits: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if threads:
        # torch through the config; OpenMP/BLAS pools (scikit-learn's boosting, numpy) through threadpoolctl,
        # since they were sized to every core when this worker imported them.
        from threadpoolctl import threadpool_limits

        config = {**config, "threads": threads}
        limits = threadpool_limits(limits=threads)
    start = time.perf_counter()
    try:
        with limits:
            results = run_audit(config, run_dir, progress=False, report=report)
    except UserError as exc:
        return {"run_dir": run_dir, "status": "error", "error": str(exc), "seconds": time.perf_counter() - start}
    except Exception as exc:  # a bug in one audit must not lose the others' results; keep its traceback
        import traceback

        log.exception("audit in %s crashed", run_dir)
        return {"run_dir": run_dir, "status": "crashed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}
    return {**summarize(results), "run_dir": run_dir, "status": "ok", "seconds": time.perf_counter() - start}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """One comparison row of an audit's results."""
    cfg = results["config"]
    target = results["models"]["target"]
    st = results["stealing"]
    block = results.get("defenses") or {}
    rec = block.get("recommended") or {}
    rec_row = next((r for r in block.get("rows", []) if r["label"] == rec.get("label")), {})
    padding = next((r for r in block.get("rows", []) if r["defense"] == "padding"), {})
    row: dict[str, Any] = {
        "dataset": cfg["dataset"]["name"],
        "arch": cfg["target"]["arch"],
        "exits": cfg["target"]["exits"],
        "seed": cfg["seed"],
        "final_test_accuracy": target["final_exit"]["test_accuracy"],
        "mean_flops_fraction": results["leakage"]["mean_flops_fraction"],
        "stealing_kde": st["stealers"]["kde"]["accuracy"],
        "stealing_supervised": st["stealers"]["supervised"]["accuracy"],
        "stealing_chosen": st["stealers"][st["chosen"]]["accuracy"],
        "stealing_chosen_balanced": st["stealers"][st["chosen"]]["balanced_accuracy"],
        "stealing_chance": st["chance"],
    }
    for key, adv in sorted((results.get("adversaries") or {}).items()):
        for kind in ("original", "hybrid"):
            best = adv.get(f"best_{kind}") or {}
            row[f"adv{key}_{kind}_auc"] = best.get("auc")
            row[f"adv{key}_{kind}_asr"] = best.get("balanced_accuracy")
    van = (results.get("vanilla") or {}).get("best_original") or {}
    row["vanilla_original_auc"] = van.get("auc")
    live = results.get("live") or {}
    row.update({
        "defense": rec.get("label"),
        "defense_oracle": rec_row.get("oracle_balanced_accuracy"),
        "defense_bayes": rec_row.get("bayes_bound"),
        "defense_added_ms": rec_row.get("mean_added_ms"),
        "padding_added_ms": padding.get("mean_added_ms"),
        "chance_balanced": block.get("chance_balanced"),
        "live_oracle": live.get("oracle_balanced_accuracy"),
        "audit_seconds": results["wall_seconds"],
    })
    return row


def run_sweep(grid_file: str | Path, out_dir: str | Path, *, executor: Literal["local", "ray"] = "local",
              workers: int = 2, address: str | None = None, threads: int | None = None,
              progress: bool = True, report: bool = True) -> dict[str, Any]:
    """Run every audit of ``grid_file`` into ``out_dir/runs/`` and write the aggregated table; return it.

    ``workers``: audits run at once (pool processes, or Ray tasks in flight; a local Ray instance gets
    ``workers × threads`` CPUs). ``threads``: torch/BLAS threads per audit, also the CPUs each Ray task asks
    for (default: this machine's cores divided among the workers). ``address``: the Ray cluster to join
    (``auto``, ``host:port``, ``ray://host:10001``); default ``RAY_ADDRESS``, else a local instance.
    ``report``: write each run's report.html (``False``: only the tables; ``mexit report RUN_DIR`` later).
    """
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if address and executor != "ray":
        raise ConfigError("--address only applies to --executor ray")
    plan = plan_sweep(grid_file)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    calls = [(cfg.to_dict(), str(out / "runs" / name), threads, report) for name, cfg in plan]
    log.info("sweep: %d audits on %s with %d workers", len(calls), executor, workers)
    start = time.perf_counter()
    if executor == "ray":
        rows = _ray_map(run_one, calls, workers=workers, threads=threads, address=address, progress=progress)
    else:
        rows = _local_map(run_one, calls, workers=workers, progress=progress)
    wall = time.perf_counter() - start
    for (name, _), (_, run_dir, *_), row in zip(plan, calls, rows, strict=True):
        row["run"] = name
        row.setdefault("run_dir", run_dir)
    aggregate = {"schema": SWEEP_SCHEMA, "grid_file": str(grid_file), "executor": executor, "workers": workers,
                 "threads_per_audit": threads, "wall_seconds": wall, "runs": rows, "provenance": provenance()}
    atomic_write_json(out / "sweep.json", aggregate)
    atomic_write_bytes(out / "sweep.csv", _csv(rows).encode())
    atomic_write_bytes(out / "sweep.md", markdown_table(rows).encode())
    return aggregate


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = ["run"]
    for row in rows:
        cols += [c for c in row if c not in cols]
    return cols


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


_MD_COLUMNS = (("run", "run"), ("final_test_accuracy", "test acc"), ("stealing_chosen", "steal (chosen)"),
               ("stealing_chance", "chance"), ("stealing_chosen_balanced", "steal bal."),
               ("adv1_original_auc", "A1 orig AUC"), ("adv1_hybrid_auc", "A1 hyb AUC"),
               ("adv2_original_auc", "A2 orig AUC"), ("adv2_hybrid_auc", "A2 hyb AUC"),
               ("vanilla_original_auc", "vanilla AUC"), ("defense", "defense*"), ("defense_oracle", "oracle at *"),
               ("chance_balanced", "1/K"), ("defense_added_ms", "+ms at *"), ("status", "status"))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table in Markdown (the main columns; the CSV and JSON hold all)."""

    def cell(v: Any, col: str) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cols = [(k, h) for k, h in _MD_COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k), k) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"
