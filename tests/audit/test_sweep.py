"""Sweeps: a grid of tiny audits on the local process pool and on Ray (when installed), one aggregated table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mexit.audit.executors import _local_map, _ray_map
from mexit.audit.sweep import plan_sweep, run_sweep
from mexit.errors import BackendUnavailableError, ConfigError
from tests.audit import _sweep_tasks
from tests.audit._tiny import TINY, TRAINED_PREFIXES, toml_of

NO_RAY = "Ray is not installed (optional extra: pip install 'mexit[ray]')"
#: Row columns that do not depend on timing: equal whichever executor ran the audit (measured: two full runs of
#: the same grid agree on these; stealing, TimeGuard and latency columns vary with the machine's load).
DETERMINISTIC = ("run", "status", "dataset", "arch", "exits", "seed", "final_test_accuracy", "mean_flops_fraction",
                 "stealing_chance", "adv1_original_auc", "adv1_hybrid_auc", "adv2_original_auc")


def _grid(tmp_path, exits=(3, 2)):
    base = tmp_path / "base.toml"
    base.write_text(toml_of({**TINY, "vanilla": {"attack": False}}))
    grid = tmp_path / "grid.toml"
    grid.write_text(f'base_config = "base.toml"\nset = ["timeguard.confirm_live=false", "tau_sweep.enabled=false"]\n'
                    f"[grid]\nexits = {list(exits)}\n")
    return grid


def test_plan_validates_every_combination(tmp_path):
    plan = plan_sweep(_grid(tmp_path))
    assert [name for name, _ in plan] == ["digits-fcn18-1-x3-s0", "digits-fcn18-1-x2-s0"]
    assert [cfg.target.exits for _, cfg in plan] == [3, 2]
    assert all(not cfg.timeguard.confirm_live and cfg.target.epochs == 2 for _, cfg in plan)
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\narchs = ["vgg16"]\n')
    with pytest.raises(ConfigError, match=r"grid run digits-vgg16-x4-s0: invalid config key target\.arch"):
        plan_sweep(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[grid]\nwidths = [1]\n")
    with pytest.raises(ConfigError, match=r"unknown key grid\.widths"):
        plan_sweep(unknown)


def _seed_cache(tiny_run, sweep_dir):
    """Reuse the session's trained stages: all of them for the x3 run; the split and the vanilla model (which
    does not depend on the exit count) for the x2 run, which trains its own target and shadow."""
    out, _ = tiny_run
    shared = ("splits-", "train-vanilla-target", "export-vanilla-target")
    for run, prefixes in (("digits-fcn18-1-x3-s0", (*shared, "train-target", "train-shadow", "export-target",
                                                    "export-shadow")),
                          ("digits-fcn18-1-x2-s0", shared)):
        dst = sweep_dir / "runs" / run
        dst.mkdir(parents=True)
        for stage in out.iterdir():
            if stage.is_dir() and stage.name.startswith(prefixes):
                shutil.copytree(stage, dst / stage.name)
        shutil.copy2(out / "audit.json", dst / "audit.json")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_trained(src: Path, dst: Path) -> None:
    """copy_trained with hard links: the stages are only read (the audit writes new files by atomic rename), and
    the tiny models' checkpoints weigh ~0.9 GB per two runs."""
    dst.mkdir(parents=True)
    for stage in src.iterdir():
        if stage.is_dir() and stage.name.startswith(TRAINED_PREFIXES):
            shutil.copytree(stage, dst / stage.name, copy_function=_link_or_copy)
    shutil.copy2(src / "audit.json", dst / "audit.json")


@pytest.fixture(scope="module")
def local_sweep(tiny_run, tmp_path_factory):
    """The two-run grid swept on the local process pool: (grid file, sweep directory, result)."""
    tmp = tmp_path_factory.mktemp("sweep-local")
    sweep_dir = tmp / "sweep"
    _seed_cache(tiny_run, sweep_dir)
    grid = _grid(tmp)
    # report=False: the per-run report's figures would take most of these tiny audits' time.
    return grid, sweep_dir, run_sweep(grid, sweep_dir, executor="local", workers=2, threads=1, progress=False,
                                      report=False)


def test_local_sweep_aggregates_two_runs(local_sweep):
    _, sweep_dir, result = local_sweep
    rows = result["runs"]
    assert [r["run"] for r in rows] == ["digits-fcn18-1-x3-s0", "digits-fcn18-1-x2-s0"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert [r["exits"] for r in rows] == [3, 2]
    for r in rows:
        assert 0 <= r["stealing_supervised"] <= 1 and r["adv2_hybrid_auc"] is not None and r["live_oracle"] is None
    on_disk = json.loads((sweep_dir / "sweep.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(rows)) and on_disk["workers"] == 2
    with open(sweep_dir / "sweep.csv") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == [r["run"] for r in rows]
    md = (sweep_dir / "sweep.md").read_text()
    assert md.count("\n") == 4 and "digits-fcn18-1-x2-s0" in md
    x2 = json.loads((sweep_dir / "runs" / "digits-fcn18-1-x2-s0" / "results.json").read_text())
    assert x2["timings"]["train-vanilla-target"]["cached"] and not x2["timings"]["train-target"]["cached"]
    assert not any((sweep_dir / "runs" / r["run"] / "report.html").exists() for r in rows)  # report=False


def test_ray_sweep_matches_local(local_sweep, tmp_path):
    """The same grid on a local Ray instance (2 workers) gives the local pool's table: same rows, same columns,
    same values wherever they do not depend on timing. The trained models are reused; querying, stealing,
    attacks and TimeGuard run again inside the Ray workers."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    grid, local_dir, local = local_sweep
    sweep_dir = tmp_path / "sweep"
    for row in local["runs"]:
        _link_trained(local_dir / "runs" / row["run"], sweep_dir / "runs" / row["run"])
    result = run_sweep(grid, sweep_dir, executor="ray", workers=2, threads=1, progress=False, report=False)
    rows = result["runs"]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert result["executor"] == "ray" and result["workers"] == 2 and result["threads_per_audit"] == 1
    assert [list(r) for r in rows] == [list(r) for r in local["runs"]]
    for ray_row, local_row in zip(rows, local["runs"], strict=True):
        assert {k: ray_row[k] for k in DETERMINISTIC} == {k: local_row[k] for k in DETERMINISTIC}
        assert ray_row["run_dir"] == str(sweep_dir.resolve() / "runs" / ray_row["run"])
        timings = json.loads((sweep_dir / "runs" / ray_row["run"] / "results.json").read_text())["timings"]
        assert timings["train-target"]["cached"] and not timings["collect-target"]["cached"]  # the worker worked
    assert json.loads((sweep_dir / "sweep.json").read_text())["runs"] == json.loads(json.dumps(rows))
    assert not ray.is_initialized()  # the instance the sweep started is shut down
    assert print.__module__ == "builtins"  # and Ray's process-wide print patch is undone


def test_ray_map_survives_a_dead_worker_and_caps_concurrency():
    """A task whose worker process dies gets a 'crashed' row and the others keep theirs; at most `workers` tasks
    run at once; the local instance started for the map is shut down."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    calls = [(i, 0.5) for i in range(5)]
    rows = _ray_map(_sweep_tasks.nap, calls, workers=2, threads=1)
    assert not ray.is_initialized()
    crashed = rows[_sweep_tasks.DIES]
    assert crashed["status"] == "crashed" and "WorkerCrashedError" in crashed["error"], crashed
    assert "\n" not in crashed["error"]
    done = [r for i, r in enumerate(rows) if i != _sweep_tasks.DIES]
    assert [r["i"] for r in done] == [0, 2, 3, 4] and all(r["status"] == "ok" for r in done)
    events = sorted([(r["start"], 1) for r in done] + [(r["end"], -1) for r in done])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


def test_local_map_keeps_finished_results_when_a_worker_dies():
    rows = _local_map(_sweep_tasks.nap, [(0, 0.0), (1, 0.0), (2, 0.0)], workers=1)
    assert rows[0]["status"] == "ok" and rows[0]["i"] == 0
    assert rows[1]["status"] == "crashed" and "BrokenProcessPool" in rows[1]["error"]
    assert len(rows) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_line_user_error(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason=NO_RAY)
    from mexit.cli import cli

    port = _free_port()
    address = f"127.0.0.1:{port}"
    start = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match=rf"no Ray cluster answers at {address} \(.*refused"):
        run_sweep(_grid(tmp_path), tmp_path / "sweep", executor="ray", address=address, progress=False)
    assert time.perf_counter() - start < 10 and not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", address)  # as `ray job submit` sets it
    with pytest.raises(BackendUnavailableError, match=f"no Ray cluster answers at {address}"):
        run_sweep(_grid(tmp_path), tmp_path / "sweep", executor="ray", progress=False)
    with pytest.raises(BackendUnavailableError, match=rf"answers at auto \([\w.:]+:{port}\) \(.*refused"):
        run_sweep(_grid(tmp_path), tmp_path / "sweep", executor="ray", address="auto", progress=False)
    monkeypatch.delenv("RAY_ADDRESS")
    res = CliRunner().invoke(cli, ["sweep", str(_grid(tmp_path)), "--out", str(tmp_path / "cli"), "--executor", "ray",
                                   "--address", f"ray://{address}"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no Ray cluster answers at ray://{address}"), res.output


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, installed or not
    with pytest.raises(BackendUnavailableError, match=r"pip install 'mexit\[ray\]'"):
        run_sweep(_grid(tmp_path), tmp_path / "sweep", executor="ray", workers=2, progress=False)


def test_bad_executor_options(tmp_path):
    with pytest.raises(ConfigError, match="--workers"):
        run_sweep(_grid(tmp_path), tmp_path / "s", workers=0)
    with pytest.raises(ConfigError, match="--threads"):
        run_sweep(_grid(tmp_path), tmp_path / "s", threads=0)
    with pytest.raises(ConfigError, match="--address only applies"):
        run_sweep(_grid(tmp_path), tmp_path / "s", address="auto")
