"""``mexit train``'s τ-rule options: the paper's rule needs a vanilla run; its absence is one line, exit 2."""

from __future__ import annotations

from click.testing import CliRunner

from mexit.cli import cli

FAST = ["train", "--dataset", "digits", "--arch", "fcn18-1", "--epochs", "1", "--limit", "120", "--batch-size",
        "16", "--threads", "1"]


def test_vanilla_rule_without_vanilla_run_is_exit_2_one_line(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [*FAST, "--exits", "3", "--tau-rule", "vanilla", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--vanilla-run" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_vanilla_run_selects_the_papers_rule(tmp_path):
    van = tmp_path / "vanilla"
    assert CliRunner().invoke(cli, [*FAST, "--exits", "1", "--out", str(van)]).exit_code == 0
    result = CliRunner().invoke(cli, [*FAST, "--exits", "3", "--vanilla-run", str(van), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "(vanilla rule)" in result.output and "vanilla model" in result.output
    assert "deployed at tau=" in result.output
    bad = CliRunner().invoke(cli, [*FAST, "--exits", "3", "--vanilla-run", str(tmp_path / "x"),
                                   "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "1-exit run" in bad.output
