"""Serving a real exported bundle: ONNX Runtime behind the server, TimeGuard in front, the CLI command."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mexit.serve import LocalClient, OIPClient, ServerProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="exporting the test bundle needs torch")
    pytest.importorskip("mexit.runtime.chained", reason="the chained runtime is not available")
    from mexit.export import export_bundle
    from tests.export import tiny

    out = tmp_path_factory.mktemp("serve-bundles") / "mlp"
    return export_bundle(tiny.tiny_mlp(), out, sample_inputs=tiny.mlp_inputs(16, seed=6), threshold=0.5,
                         policy="entropy", dataset_name="toy-rows", dataset_kind="tabular", exporter="legacy",
                         save_torch_programs=False, class_names=["a", "b", "c", "d"])


def _inputs(n: int) -> np.ndarray:
    from tests.export import tiny

    return tiny.mlp_inputs(n, seed=9)


def test_served_bundle_equals_in_process_runtime(mlp_bundle: Path) -> None:
    from mexit.runtime import EarlyExitRuntime

    runtime = EarlyExitRuntime(mlp_bundle)
    x = _inputs(40)
    exits = runtime.predict(x).exit_index
    assert len(np.unique(exits)) > 1  # the batch mixes exits, so per-sample early exit is exercised
    with ServerProcess(mlp_bundle, expose_exit=True) as server, OIPClient(server.url, server.model_name) as client:
        assert server.model_name == "tiny-mlp-toy-rows"
        meta = client.metadata()
        assert meta["dataset"] == "toy-rows" and meta["class_names"] == ["a", "b", "c", "d"]
        assert meta["inputs"][0]["shape"] == [-1, 12]
        remote = client.infer(x).outputs
        single = [client.infer(x[i : i + 1]).outputs["exit_index"][0] for i in range(5)]
    local = LocalClient(runtime, expose_exit=True).infer(x).outputs
    for name in ("probabilities", "label", "exit_index"):
        np.testing.assert_array_equal(remote[name], local[name])
    np.testing.assert_array_equal(single, exits[:5])  # batch-1 exits equal the in-batch ones


def test_timeguard_server_answers_the_same_labels(mlp_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("mexit.defense.guarded", reason="the defense package is not available")
    from mexit.defense import write_key_file
    from mexit.runtime import EarlyExitRuntime

    key = write_key_file(tmp_path / "timeguard.key")
    x = _inputs(8)
    with ServerProcess(mlp_bundle, defense="timeguard", defense_params={"sigma_ms": 2.0}, key_file=key) as server, \
            OIPClient(server.url, server.model_name) as client:
        labels = client.infer(x).outputs["label"]
        first = [client.infer(x[i : i + 1]).rtt_ns for i in range(4)]
    np.testing.assert_array_equal(labels, EarlyExitRuntime(mlp_bundle).predict(x).labels)
    assert min(first) > 0


def test_timeguard_needs_a_key(mlp_bundle: Path) -> None:
    pytest.importorskip("mexit.defense.guarded", reason="the defense package is not available")
    from mexit.errors import UserError

    env = {k: v for k, v in os.environ.items() if k != "MEXIT_TIMEGUARD_KEY"}
    with pytest.raises(UserError, match="key"):
        ServerProcess(mlp_bundle, defense="timeguard", defense_params={"sigma_ms": 2.0}, env=env).start()


def test_cli_serve_command_end_to_end(mlp_bundle: Path) -> None:
    """`mexit serve BUNDLE --port 0` prints its URL, answers, and stops cleanly on SIGINT."""
    code = "import sys; from mexit.cli.serve import command; command(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", code, str(mlp_bundle), "--port", "0", "--expose", "label"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the CLI printed nothing within 60 s"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "serving 'tiny-mlp-toy-rows' at http://127.0.0.1:" in line and "defense: none" in line
        url = line.split(" at ")[1].split("/v2/")[0]
        plan = proc.stdout.readline()  # type: ignore[union-attr]
        assert plan.startswith("predictions run on the event loop"), plan  # a tiny model: always inline
        with OIPClient(url, "tiny-mlp-toy-rows", timeout_s=30) as client:
            assert client.ready()
            out = client.infer(_inputs(3)).outputs
        assert set(out) == {"label"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]


def test_cli_serve_busy_port_is_a_user_error(mlp_bundle: Path) -> None:
    import socket

    from click.testing import CliRunner

    from mexit.cli.serve import command
    from mexit.errors import UserError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(command, [str(mlp_bundle), "--port", str(port)])
    assert isinstance(result.exception, UserError)  # the mexit group prints it as one line, exit 2
    assert f"port {port} on 127.0.0.1 is in use" in str(result.exception)


def test_connect_a_bundle_gives_a_local_client_and_the_owner_runtime(mlp_bundle: Path) -> None:
    from mexit.serve import connect

    dep = connect(mlp_bundle, expose_exit=True, warmup=1)
    x = _inputs(6)
    out = dep.client.infer(x).outputs
    np.testing.assert_array_equal(out["exit_index"], dep.owner.predict(x).exit_index)


def test_connect_a_url_needs_a_model_name() -> None:
    from mexit.errors import ConfigError
    from mexit.serve import connect

    with pytest.raises(ConfigError, match="pass the name of the model"):
        connect("http://127.0.0.1:9")


@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_deployed_applies_a_registered_defense(mlp_bundle: Path, tmp_path: Path, mode: str) -> None:
    """The same defense spec guards an in-process deployment and a served one (its release ≥ padding time)."""
    import time

    from mexit.serve import deployed

    with deployed(mlp_bundle, mode=mode, defense="padding", defense_params={"quantile": 1.0, "margin_ms": 5}
                  ) as client:
        x = _inputs(1)
        client.infer(x)
        start = time.perf_counter()
        client.infer(x)
        assert time.perf_counter() - start >= 0.005  # released no earlier than the 5 ms margin


@pytest.mark.parametrize("adapt", [True, False])
def test_adapt_reaches_the_guard_in_process_and_the_server_child(mlp_bundle: Path, adapt: bool) -> None:
    """``adapt=False`` (``mexit serve --no-adapt``) keeps a fitted defense on its start-up calibration."""
    from mexit.serve import deployed

    with deployed(mlp_bundle, mode="in-process", defense="padding", defense_params={"quantile": 1.0},
                  adapt=adapt) as client:
        assert client.runtime.describe()["adapt"] is adapt
    args = ServerProcess(mlp_bundle, defense="padding", adapt=adapt).args
    assert ("--no-adapt" in args) is (not adapt)


@pytest.mark.parametrize("mode", ["in-process", "server"])
def test_the_deployment_reports_its_guard_when_torn_down(mlp_bundle: Path, mode: str) -> None:
    """What the served guard did (its schedule, requests, overruns) comes back after the deployment closes,
    from a server child too (written on its clean shutdown, never sent to clients); nothing for no defense."""
    from mexit.serve import deployed

    with deployed(mlp_bundle, mode=mode, defense="padding", defense_params={"quantile": 1.0}) as client:
        for _ in range(3):
            client.infer(_inputs(1))
        assert "requests" not in client.metadata() and "clean_times_s" not in client.metadata()
    state = client.deployment_state
    assert state is not None and state["policy"] == "padding" and state["requests"] == 3, state
    assert state["adapt"] is True and len(state["clean_times_s"]) == 3
    with deployed(mlp_bundle, mode=mode) as plain:
        plain.infer(_inputs(1))
    assert plain.deployment_state is None


def test_backend_options_reach_the_in_process_and_the_owner_runtime(mlp_bundle: Path) -> None:
    from mexit.serve import deployed
    from mexit.serve.deploy import owner_runtime

    assert owner_runtime(mlp_bundle, backend_opts={"int8_heads": True}).backend.options["int8_heads"] is True
    assert owner_runtime(mlp_bundle).backend.options["int8_heads"] is False
    with deployed(mlp_bundle, mode="in-process", backend_opts={"int8_heads": True}) as client:
        assert client.runtime.backend.options["int8_heads"] is True


def test_backend_options_are_passed_to_the_server_child(mlp_bundle: Path) -> None:
    from mexit.errors import UserError

    server = ServerProcess(mlp_bundle, backend_opts={"int8_heads": True, "single_graph": None, "spinning": False})
    assert server.args[-6:] == ["--backend-opt", "int8_heads=true", "--backend-opt", "single_graph=none",
                                "--backend-opt", "spinning=false"]
    with pytest.raises(UserError, match="takes no option 'int8_head'"), \
            ServerProcess(mlp_bundle, backend_opts={"int8_head": True}, startup_timeout_s=60):
        pass  # the child parses them as ``mexit serve --backend-opt`` does, so a misspelt one stops it
