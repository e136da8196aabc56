"""Server processes: port conflicts, lifecycle of ServerProcess, the `python -m mexit.cli serve` entry, the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mexit.errors import UserError
from mexit.serve import LocalClient, OIPClient, ServerProcess, bind_socket
from mexit.serve.testing import ToyRuntime
from tests.serve.conftest import TOY_FACTORY, batch

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_port_in_use_is_a_user_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use; pass --port"):
            bind_socket("127.0.0.1", port)


def test_bind_socket_port_zero_picks_a_free_port() -> None:
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_module_entry_reports_busy_port_and_exits_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "mexit.cli", "serve", "--factory", TOY_FACTORY, "--port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr and "Traceback" not in done.stderr


def test_module_entry_needs_a_bundle_or_factory() -> None:
    done = subprocess.run([sys.executable, "-m", "mexit.cli", "serve"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 2 and "bundle" in done.stderr


def test_server_process_always_terminates_its_child() -> None:
    server = ServerProcess(factory=TOY_FACTORY, factory_kwargs={"seed": 1}, expose_exit=True, expose="label")
    with pytest.raises(KeyError), server:
        pid = server.pid
        assert _alive(pid) and server.running()
        with OIPClient(server.url, server.model_name) as client:
            x = batch(30)
            out = client.infer(x).outputs
            expected = LocalClient(ToyRuntime(seed=1), expose="label", expose_exit=True).infer(x).outputs
            assert set(out) == {"label", "exit_index"}
            for name in out:
                np.testing.assert_array_equal(out[name], expected[name])
        raise KeyError("the body failed")
    assert not _alive(pid) and not server.running()
    assert "serving 'toyruntime'" in server.last_log


def test_server_process_reports_a_failing_start() -> None:
    server = ServerProcess(factory="mexit.serve.testing:NoSuchRuntime")
    with pytest.raises(UserError, match="exited with code 2") as info:
        server.start()
    assert "NoSuchRuntime" in str(info.value)


def test_server_process_needs_exactly_one_source() -> None:
    with pytest.raises(UserError):
        ServerProcess()
    with pytest.raises(UserError):
        ServerProcess("bundle", factory=TOY_FACTORY)


def test_server_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """A test or benchmark that is killed never leaves a server behind (--exit-with-parent)."""
    script = textwrap.dedent(f"""
        import os
        from mexit.serve import ServerProcess
        server = ServerProcess(factory={TOY_FACTORY!r}).start()
        print(server.pid, flush=True)
        os._exit(0)  # no cleanup: the parent just vanishes
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, cwd=REPO)
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_cli_command_help_and_missing_bundle(tmp_path: Path) -> None:
    from mexit.cli.serve import command

    runner = CliRunner()
    helped = runner.invoke(command, ["--help"])
    assert helped.exit_code == 0
    for option in ("--host", "--port", "--model-name", "--expose", "--expose-exit", "--backend", "--threads",
                   "--device", "--fp16", "--max-body-mb", "--defense", "--param", "--timeguard-sigma", "--key-file",
                   "--pad-to-final", "--adapt / --no-adapt"):
        assert option in helped.output
    from mexit.defense.registry import defense_names
    from mexit.runtime.registry import backend_names

    flat = " ".join(helped.output.split())
    assert all(name in flat for name in [*defense_names(), *backend_names()])  # listed from the registries
    missing = runner.invoke(command, [str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@pytest.mark.parametrize(("args", "message"), [
    (["--defense", "nope"], "valid defenses: optimal, padding, timeguard"),
    (["--defense", "timeguard", "--param", "sigma_ms=0"], "sigma_ms must be > 0"),
    (["--defense", "timeguard", "--param", "sigma_ms=-1"], "sigma_ms must be > 0"),
    (["--defense", "padding", "--param", "quantile=1.5"], "quantile must be in (0, 1]"),
    (["--defense", "padding", "--param", "quantile=0"], "quantile must be in (0, 1]"),
    (["--defense", "timeguard", "--param", "foo=1"], "its parameters: sigma_ms"),
    (["--defense", "timeguard", "--param", "sigma_ms"], "is not NAME=VALUE"),
    (["--timeguard-sigma", "2", "--pad-to-final"], "choose one defense"),
    (["--param", "sigma_ms=2"], "needs --defense"),
    (["--backend", "openvinox"], "unknown backend 'openvinox'; use one of onnxruntime"),
])
def test_bad_defense_or_backend_is_one_line_and_exit_two(tmp_path: Path, args: list[str], message: str) -> None:
    from mexit.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
