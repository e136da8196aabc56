"""``benchmarks/host_probe.py``: every deployment-speed JSON says what the host could do while it ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from host_probe import FLAGS, HostRun, cpu_description  # a sibling script, not a package module


def test_a_run_records_the_load_schema_and_both_probes() -> None:
    host = HostRun.begin()
    load = host.load_record()
    assert set(load) == {"before", "after", "cpus"} and len(load["before"]) == len(load["after"]) == 3
    record = host.host_record()
    for when in ("probe_before", "probe_after"):
        probe = record[when]
        # finite, positive and within what a CPU core can do (not a mistimed call or a unit slip)
        assert 0.1 < probe["gemm_gflops"] < 10_000 and 0.1 < probe["gemv_gbytes_s"] < 10_000, probe
    assert record is not host.host_record() and host.host_record()["probe_after"] == record["probe_after"]


def test_the_cpu_description_names_only_known_flags() -> None:
    info = cpu_description()
    assert info["cpus"] >= 1
    if sys.platform.startswith("linux"):
        assert set(info["flags"]) <= set(FLAGS) and isinstance(info["hypervisor"], bool)
