"""User errors on the command line: one line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mexit.cli import cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--dataset", "mnist", "--arch", "fcn18-1", "--out", "{out}"], "unknown dataset"),
        (["train", "--dataset", "digits", "--arch", "resnet9000", "--out", "{out}"], "unknown architecture"),
        (["train", "--dataset", "digits", "--arch", "fcn18-1", "--exits", "7", "--out", "{out}"], "exits"),
        (["train", "--dataset", "digits", "--arch", "fcn18-1", "--exits", "0", "--out", "{out}"], "exits"),
        (["train", "--dataset", "location", "--data-root", "{tmp}/empty", "--arch", "fcn18-1", "--out", "{out}"],
         "location"),
        (["train", "--dataset", "cifar10", "--arch", "resnet56", "--out", "{out}"], "data-root"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    args = [a.format(out=out, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(lines) <= 3  # click usage errors print "Usage/Try" lines; ours print exactly one
    assert not out.exists()


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.output


def test_console_entry_runs_as_module():
    proc = subprocess.run([sys.executable, "-c", "from mexit.cli import main; main()", "--version"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "mexit" in proc.stdout


def test_attack_rejects_unknown_attack_names(tmp_path):
    result = CliRunner().invoke(cli, ["attack", "--target", "b", "--target-run", str(tmp_path), "--shadow", "b",
                                      "--shadow-run", str(tmp_path), "--attacks", "nope", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown attack" in result.output and "Traceback" not in result.output


def test_attack_on_an_unfinished_run_is_a_user_error(tmp_path):
    result = CliRunner().invoke(cli, ["attack", "--target", "b", "--target-run", str(tmp_path), "--shadow", "b",
                                      "--shadow-run", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "not a complete training run" in result.output


def test_attack_adversary_three_needs_its_own_shadow(tmp_path):
    result = CliRunner().invoke(cli, ["attack", "--target", "b", "--target-run", str(tmp_path), "--shadow", "b",
                                      "--shadow-run", str(tmp_path), "--adversary", "3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--shadow3" in result.output and "Traceback" not in result.output
