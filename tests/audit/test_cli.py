"""``mexit audit`` / ``mexit report`` / ``mexit sweep``: thin commands, user errors as one line with exit code 2."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from mexit.cli import audit as audit_cli
from mexit.cli import cli
from mexit.cli import report as report_cli
from mexit.cli import sweep as sweep_cli
from tests.audit._tiny import TINY, toml_of


@pytest.fixture(scope="module")
def group():
    # The lead registers these modules in mexit/cli/__init__.py; add them here if that has not happened yet.
    for module in (audit_cli, report_cli, sweep_cli):
        if module.command.name not in cli.commands:
            cli.add_command(module.command)
    return cli


def test_audit_command_resumes_a_finished_run_and_prints_the_report_path(group, tiny_run, tmp_path):
    out, _ = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    config = tmp_path / "audit.toml"
    config.write_text(toml_of(TINY))
    result = CliRunner().invoke(group, ["audit", str(config), "--out", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"report:  {run_dir / 'report.html'}" in result.output
    assert "the stealer adversary 2 picks" in result.output


def test_print_config_applies_overrides(group):
    result = CliRunner().invoke(group, ["audit", "--set", "target.exits=2", "--set", "deployment.mode=in-process",
                                        "--print-config"])
    assert result.exit_code == 0, result.output
    assert '"exits": 2' in result.output and '"mode": "in-process"' in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["audit", "--set", "target.exits=9"], "invalid config key target.exits"),
        (["audit", "--set", "target.colour=1"], "unknown config key target.colour"),
        (["audit", "--set", "deployment.backend_options.int8_head=true"], "takes no option 'int8_head'"),
        (["audit", "{tmp}/missing.toml"], "does not exist"),
        (["report", "{tmp}"], "holds no results.json"),
        (["sweep", "{tmp}/missing.toml"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(group, tmp_path, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(group, [*args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_report_command_rebuilds_the_page(group, tiny_run, tmp_path):
    out, _ = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(group, ["report", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").is_file() and result.output.strip() == f"report: {run_dir / 'report.html'}"
