"""``benchmarks/run_all.sh`` (``make bench``): it names what it skips and never passes a partial rerun off as full."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _list(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    missing = str(tmp_path / "missing")
    base = {"LOC_RUN": missing, "LOC_BUNDLE": missing, "CIFAR_RUN": missing, "CIFAR_BUNDLE": missing,
            "LOC_PLAIN_RUN": missing, "LOC_PLAIN_BUNDLE": missing, "A2": missing, "CLAIM_RUNS": missing,
            "LOCATION_DATA": missing}
    return subprocess.run(["bash", str(SCRIPT)], env={**os.environ, **base, **env, "BENCH_LIST": "1"},
                          capture_output=True, text=True, timeout=60, check=False)


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_missing_inputs_are_skipped_by_name_and_fail_the_run(tmp_path: Path) -> None:
    out = _list(tmp_path)
    assert out.returncode == 1, out.stderr
    assert f"skip  runtime latency, ResNet-56 (missing {tmp_path / 'missing'})" in out.stdout
    assert "run   training throughput" in out.stdout  # needs no input
    assert "section(s) skipped" in out.stdout
    assert "Traceback" not in out.stderr


def test_listing_runs_nothing_and_honours_overrides(tmp_path: Path) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    run.mkdir()
    bundle.mkdir()
    out = _list(tmp_path, CIFAR_RUN=str(run), CIFAR_BUNDLE=str(bundle))
    assert "run   runtime latency, ResNet-56" in out.stdout
    assert "skip  runtime latency, ResNet-56" not in out.stdout
    # BENCH_LIST=1 lists only: had a benchmark run on the empty directories, it would have failed loudly
    assert out.stderr == ""
