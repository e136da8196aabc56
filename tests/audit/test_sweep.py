"""Sweeps: a grid of tiny audits on the local process pool (and Ray when installed), one aggregated table."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil

import pytest

from mexit.audit.sweep import plan_sweep, run_sweep
from mexit.errors import BackendUnavailableError, ConfigError
from tests.audit._tiny import TINY, toml_of

HAS_RAY = importlib.util.find_spec("ray") is not None


def _grid(tmp_path, exits=(3, 2)):
    base = tmp_path / "base.toml"
    base.write_text(toml_of({**TINY, "vanilla": {"attack": False}}))
    grid = tmp_path / "grid.toml"
    grid.write_text(f'base_config = "base.toml"\nset = ["timeguard.confirm_live=false"]\n'
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


def test_local_sweep_aggregates_two_runs(tiny_run, tmp_path):
    sweep_dir = tmp_path / "sweep"
    _seed_cache(tiny_run, sweep_dir)
    result = run_sweep(_grid(tmp_path), sweep_dir, executor="local", workers=2, threads=1, progress=False)
    rows = result["runs"]
    assert [r["run"] for r in rows] == ["digits-fcn18-1-x3-s0", "digits-fcn18-1-x2-s0"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert [r["exits"] for r in rows] == [3, 2]
    for r in rows:
        assert 0 <= r["stealing_supervised"] <= 1 and r["adv2_hybrid_auc"] is not None and r["live_stealing"] is None
    on_disk = json.loads((sweep_dir / "sweep.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(rows)) and on_disk["workers"] == 2
    with open(sweep_dir / "sweep.csv") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == [r["run"] for r in rows]
    md = (sweep_dir / "sweep.md").read_text()
    assert md.count("\n") == 4 and "digits-fcn18-1-x2-s0" in md
    x2 = json.loads((sweep_dir / "runs" / "digits-fcn18-1-x2-s0" / "results.json").read_text())
    assert x2["timings"]["train-vanilla-target"]["cached"] and not x2["timings"]["train-target"]["cached"]


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (optional extra mexit[ray])")
def test_ray_sweep_aggregates_two_runs(tiny_run, tmp_path):
    sweep_dir = tmp_path / "sweep"
    _seed_cache(tiny_run, sweep_dir)
    result = run_sweep(_grid(tmp_path), sweep_dir, executor="ray", workers=2, threads=1, progress=False)
    assert [r["status"] for r in result["runs"]] == ["ok", "ok"]
    assert result["executor"] == "ray"


@pytest.mark.skipif(HAS_RAY, reason="checks the message shown when Ray is absent")
def test_ray_executor_without_ray_says_how_to_install(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"pip install 'mexit\[ray\]'"):
        run_sweep(_grid(tmp_path), tmp_path / "sweep", executor="ray", workers=2, progress=False)


def test_bad_executor_options(tmp_path):
    with pytest.raises(ConfigError, match="--workers"):
        run_sweep(_grid(tmp_path), tmp_path / "s", workers=0)
    with pytest.raises(ConfigError, match="--address only applies"):
        run_sweep(_grid(tmp_path), tmp_path / "s", address="auto")
