"""``mexit keygen``: writes a 0600 hex key file, never prints the key, refuses to overwrite."""

from __future__ import annotations

import stat

import pytest
from click.testing import CliRunner

from mexit.cli.keygen import command
from mexit.defense import load_key
from mexit.errors import ConfigError


def test_keygen_writes_a_private_key_file(tmp_path) -> None:
    path = tmp_path / "tg.key"
    result = CliRunner().invoke(command, ["--out", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert len(key) == 32
    assert key.hex() not in result.output and str(path) in result.output

    again = CliRunner().invoke(command, ["--out", str(path)])
    assert again.exit_code != 0 and isinstance(again.exception, ConfigError)
    assert "--force" in str(again.exception)
    assert load_key(path) == key

    forced = CliRunner().invoke(command, ["--out", str(path), "--force", "--bytes", "64"])
    assert forced.exit_code == 0, forced.output
    assert len(load_key(path)) == 64 and load_key(path) != key

    short = CliRunner().invoke(command, ["--out", str(tmp_path / "short.key"), "--bytes", "16"])
    assert short.exit_code == 2 and not (tmp_path / "short.key").exists()


def test_keygen_through_the_mexit_group(tmp_path) -> None:
    from mexit.cli import cli

    if "keygen" not in cli.commands:
        pytest.skip("mexit.cli.keygen is not registered in mexit.cli yet")
    path = tmp_path / "k"
    assert CliRunner().invoke(cli, ["keygen", "--out", str(path)]).exit_code == 0
    result = CliRunner().invoke(cli, ["keygen", "--out", str(path)])
    assert result.exit_code == 2 and "already exists" in result.output
