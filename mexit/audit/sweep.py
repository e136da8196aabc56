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
(``executor="ray"``: ``ray.init(address=...)`` to join a cluster, else a local instance with
``num_cpus=workers``; each task asks for one CPU). Audits are cached like single runs, so re-running a
sweep only does what is missing. Results are aggregated into ``sweep.json``, ``sweep.csv`` and
``sweep.md``. A failing audit is reported in its row and does not stop the others.
"""

from __future__ import annotations

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
from mexit.errors import BackendUnavailableError, ConfigError, UserError

log = logging.getLogger(__name__)

SWEEP_SCHEMA = "mexit.sweep/1"
RAY_HINT = "pip install 'mexit[ray]' (or pip install 'ray[default]')"


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


def run_one(config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """One sweep task: run the audit (no report progress bars) and return its row. Top-level for pickling."""
    import contextlib

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
            results = run_audit(config, run_dir, progress=False)
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
    tg = results["timeguard"]
    rec = tg["recommended"]["row"]
    row: dict[str, Any] = {
        "dataset": cfg["dataset"]["name"],
        "arch": cfg["target"]["arch"],
        "exits": cfg["target"]["exits"],
        "seed": cfg["seed"],
        "final_test_accuracy": target["final_exit"]["test_accuracy"],
        "mean_flops_fraction": results["leakage"]["mean_flops_fraction"],
        "stealing_kde": st["kde"]["accuracy"],
        "stealing_supervised": st["supervised"]["accuracy"],
        "stealing_chance": st["chance"],
    }
    for key, adv in sorted((results.get("adversaries") or {}).items()):
        for kind in ("original", "hybrid"):
            best = adv.get(f"best_{kind}") or {}
            row[f"adv{key}_{kind}_auc"] = best.get("auc")
            row[f"adv{key}_{kind}_asr"] = best.get("balanced_accuracy")
    van = (results.get("vanilla") or {}).get("best_original") or {}
    row["vanilla_original_auc"] = van.get("auc")
    row.update({
        "timeguard_sigma_ms": tg["recommended"]["sigma_ms"],
        "timeguard_met": tg["recommended"]["met"],
        "timeguard_stealing": max(rec["kde_accuracy"], rec["supervised_accuracy"]),
        "timeguard_added_ms": rec["mean_added_ms"],
        "timeguard_relative_latency": rec["relative_mean_increase"],
        "padding_relative_latency": tg["padding"]["relative_mean_increase"],
        "live_stealing": (max(results["live"]["kde_accuracy"], results["live"]["supervised_accuracy"])
                          if results.get("live") else None),
        "audit_seconds": results["wall_seconds"],
    })
    return row


def _ray_map(tasks: list[tuple[dict[str, Any], str]], workers: int, address: str | None,
             threads: int | None) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            root = str(Path(__file__).resolve().parents[2])
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                         p for p in (root, os.environ.get("PYTHONPATH")) if p)}})
    try:
        remote = ray.remote(num_cpus=1)(run_one)
        return list(ray.get([remote.remote(cfg, run_dir, threads) for cfg, run_dir in tasks]))
    finally:
        if started_here:
            ray.shutdown()


def _local_map(tasks: list[tuple[dict[str, Any], str]], workers: int, threads: int | None,
               progress: bool) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    # spawn: a forked child would inherit torch's and ONNX Runtime's thread pools in an unknown state.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_one, cfg, run_dir, threads) for cfg, run_dir in tasks]
        rows = []
        for fut in tqdm(futures, desc="sweep", unit="audit", disable=not progress):
            rows.append(fut.result())
    return rows


def run_sweep(grid_file: str | Path, out_dir: str | Path, *, executor: Literal["local", "ray"] = "local",
              workers: int = 2, address: str | None = None, threads: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run every audit of ``grid_file`` into ``out_dir/runs/`` and write the aggregated table; return it.

    ``workers``: parallel audits (processes, or Ray CPUs of a local instance). ``threads``: torch threads
    per audit (default: the machine's cores divided among the workers).
    """
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if address and executor != "ray":
        raise ConfigError("--address only applies to --executor ray")
    plan = plan_sweep(grid_file)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    tasks = [(cfg.to_dict(), str(out / "runs" / name)) for name, cfg in plan]
    log.info("sweep: %d audits on %s with %d workers", len(tasks), executor, workers)
    start = time.perf_counter()
    if executor == "ray":
        rows = _ray_map(tasks, workers, address, threads)
    else:
        rows = _local_map(tasks, workers, threads, progress)
    wall = time.perf_counter() - start
    for (name, _), row in zip(plan, rows, strict=True):
        row["run"] = name
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


_MD_COLUMNS = (("run", "run"), ("final_test_accuracy", "test acc"), ("stealing_supervised", "steal (sup)"),
               ("stealing_kde", "steal (KDE)"), ("stealing_chance", "chance"), ("adv1_original_auc", "A1 orig AUC"),
               ("adv1_hybrid_auc", "A1 hyb AUC"), ("adv2_original_auc", "A2 orig AUC"),
               ("adv2_hybrid_auc", "A2 hyb AUC"), ("vanilla_original_auc", "vanilla AUC"),
               ("timeguard_sigma_ms", "σ* ms"), ("timeguard_stealing", "steal at σ*"),
               ("timeguard_relative_latency", "latency at σ*"), ("status", "status"))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table in Markdown (the main columns; the CSV and JSON hold all)."""

    def cell(v: Any, col: str) -> str:
        if v is None:
            return "–"
        if col == "timeguard_relative_latency" and isinstance(v, float):
            return f"{100 * v:+.1f}%"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cols = [(k, h) for k, h in _MD_COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k), k) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"
