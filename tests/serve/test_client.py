"""OIPClient against a real server subprocess and against stub servers; LocalClient parity."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pytest

from mexit.errors import InputError, UserError
from mexit.serve import LocalClient, OIPClient, ServerProcess
from mexit.serve.client import RequestRejectedError, ServerError, ServerUnreachableError
from mexit.serve.testing import ToyRuntime
from tests.serve.conftest import TOY_SEED, batch


def test_outputs_equal_in_process_runtime(toy_server: ServerProcess) -> None:
    runtime = ToyRuntime(seed=TOY_SEED)
    local = LocalClient(runtime)
    x = batch(64, seed=3)
    with OIPClient(toy_server.url, toy_server.model_name) as client:
        remote = client.infer(x)
        for _ in range(3):  # connection reuse: several calls on one client
            again = client.infer(x[:1])
            assert again.rtt_ns > 0
    expected = local.infer(x)
    assert set(remote.outputs) == set(expected.outputs) == {"probabilities", "label"}
    for name in expected.outputs:
        assert remote.outputs[name].dtype == expected.outputs[name].dtype
        np.testing.assert_array_equal(remote.outputs[name], expected.outputs[name])
    assert isinstance(remote.rtt_ns, int) and remote.rtt_ns > 0
    np.testing.assert_array_equal(remote.outputs["label"], runtime.predict(x).labels)


def test_metadata_ready_and_requested_outputs(toy_server: ServerProcess) -> None:
    with OIPClient(toy_server.url, "toy") as client:
        assert client.ready()
        meta = client.metadata()
        assert meta["name"] == "toy" and meta["inputs"][0]["shape"] == [-1, 16]
        assert meta == LocalClient(ToyRuntime(seed=TOY_SEED), model_name="toy").metadata()
        assert client.server_metadata()["name"] == "mexit"
        only = client.infer(batch(2), outputs=["label"])
        assert set(only.outputs) == {"label"}
    assert not OIPClient(toy_server.url, "nope", retries=0).ready()


def test_client_errors_are_not_retried(toy_server: ServerProcess) -> None:
    with OIPClient(toy_server.url, "toy", retries=3, backoff_s=1.0) as client:
        start = time.monotonic()
        with pytest.raises(RequestRejectedError) as bad_shape:
            client.infer(np.zeros((2, 15), dtype=np.float32))
        assert time.monotonic() - start < 1.0  # no backoff sleeps: a 400 is final
        assert bad_shape.value.status == 400 and "[n, 16]" in bad_shape.value.message
        assert isinstance(bad_shape.value, InputError)
        with pytest.raises(RequestRejectedError):
            client.infer(batch(1), outputs=["exit_index"])  # not exposed by this deployment
    with OIPClient(toy_server.url, "other", retries=3, backoff_s=1.0) as client, \
            pytest.raises(ServerError) as unknown:
        client.infer(batch(1))
    assert unknown.value.status == 404 and not isinstance(unknown.value, InputError)


@pytest.mark.parametrize("binary", [None, True, False])
def test_binary_tensor_data_against_the_server(toy_server: ServerProcess, binary: bool | None) -> None:
    """Binary on, off, or (None) chosen from the server metadata, which lists the extension: same outputs."""
    x = batch(16, seed=8)
    expected = LocalClient(ToyRuntime(seed=TOY_SEED), expose_exit=False).infer(x).outputs
    with OIPClient(toy_server.url, "toy", binary=binary) as client:
        result = client.infer(x)
        assert client.binary is (binary if binary is not None else True)
        only = client.infer(x[:2], outputs=["label"])
    assert set(only.outputs) == {"label"}
    for name, arr in expected.items():
        assert result.outputs[name].dtype == arr.dtype
        np.testing.assert_array_equal(result.outputs[name], arr)


def test_binary_auto_falls_back_to_json(stub: Callable[..., str]) -> None:
    url = stub([])
    with OIPClient(url, "toy") as client:
        assert client.infer(batch(1)).outputs["label"].tolist() == [3]
        assert client.binary is False
    (body,) = stub.handler.bodies  # type: ignore[attr-defined]
    assert json.loads(body)["inputs"][0]["data"]  # plain JSON, no binary part


def test_client_side_input_checks() -> None:
    with OIPClient("http://127.0.0.1:9", "toy") as client, pytest.raises(InputError, match="floating-point"):
        client.infer(np.zeros((1, 16), dtype=np.int64))
    with pytest.raises(UserError, match="http://HOST:PORT"):
        OIPClient("127.0.0.1:8000", "toy")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_the_url() -> None:
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    client = OIPClient(url, "toy", retries=2, backoff_s=0.01, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(ServerUnreachableError) as info:
        client.infer(batch(1))
    elapsed = time.monotonic() - start
    assert url in str(info.value) and "3 attempt" in str(info.value)
    assert 0.03 <= elapsed < 2.0  # two backoff sleeps (0.01 + 0.02 s), no long hang
    assert not client.ready()


# -- stub servers for retry semantics --------------------------------------------------------------------------
class _Stub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: ClassVar[list[tuple[int, bytes]]] = []
    hits: ClassVar[list[str]] = []
    bodies: ClassVar[list[bytes]] = []
    connections: ClassVar[list[int]] = []
    drop_after_response = False
    delay_s = 0.0

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(1)

    def do_GET(self) -> None:  # server metadata without the binary extension: clients must send JSON
        body = json.dumps({"name": "stub", "version": "0", "extensions": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        type(self).bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
        type(self).hits.append(self.path)
        time.sleep(self.delay_s)
        status, body = self.script.pop(0) if self.script else (200, _ok_body())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.drop_after_response:  # close without saying so: the client's kept-alive socket goes stale
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def _ok_body() -> bytes:
    return json.dumps({"model_name": "toy", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]}).encode()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up is expected here


@pytest.fixture
def stub() -> Iterator[Callable[..., str]]:
    servers: list[_QuietServer] = []

    def start(script: list[tuple[int, bytes]], *, drop: bool = False, delay_s: float = 0.0) -> str:
        handler = type("Handler", (_Stub,), {"script": list(script), "hits": [], "bodies": [], "connections": [],
                                             "drop_after_response": drop, "delay_s": delay_s})
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        start.handler = handler  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_retries_5xx_then_succeeds(stub: Callable[..., str]) -> None:
    url = stub([(503, b'{"error": "busy"}'), (500, b"oops")])
    with OIPClient(url, "toy", retries=2, backoff_s=0.001) as client:
        result = client.infer(batch(1))
    assert result.outputs["label"].tolist() == [3]
    assert len(stub.handler.hits) == 3  # type: ignore[attr-defined]


def test_gives_up_after_bounded_5xx_retries(stub: Callable[..., str]) -> None:
    url = stub([(503, b'{"error": "busy"}')] * 5)
    with OIPClient(url, "toy", retries=1, backoff_s=0.001) as client, pytest.raises(ServerError) as info:
        client.infer(batch(1))
    assert info.value.status == 503 and info.value.message == "busy"
    assert len(stub.handler.hits) == 2  # type: ignore[attr-defined]


def test_4xx_from_any_server_is_not_retried(stub: Callable[..., str]) -> None:
    url = stub([(422, b"not json at all")])
    with OIPClient(url, "toy", retries=3, backoff_s=0.001) as client, pytest.raises(ServerError) as info:
        client.infer(batch(1))
    assert info.value.status == 422 and "not json at all" in info.value.message
    assert len(stub.handler.hits) == 1  # type: ignore[attr-defined]


def test_stale_keep_alive_connection_is_reopened_silently(stub: Callable[..., str]) -> None:
    url = stub([], drop=True)
    with OIPClient(url, "toy", retries=0) as client:
        for _ in range(3):
            assert client.infer(batch(1)).outputs["label"].tolist() == [3]
    handler = stub.handler  # type: ignore[attr-defined]
    assert len(handler.hits) == 3 and len(handler.connections) == 3  # each call had to reconnect


def test_timeout_counts_as_transport_failure(stub: Callable[..., str]) -> None:
    url = stub([], delay_s=0.5)
    with OIPClient(url, "toy", retries=1, backoff_s=0.001, timeout_s=0.1) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnreachableError, match="timed out"):
            client.infer(batch(1))
    assert time.monotonic() - start < 1.0


# -- LocalClient -------------------------------------------------------------------------------------------------
def test_local_client_mirrors_the_server_interface(toy: ToyRuntime) -> None:
    x = batch(20)
    default = LocalClient(toy).infer(x)
    assert set(default.outputs) == {"probabilities", "label"} and default.rtt_ns > 0
    assert set(LocalClient(toy, expose="label").infer(x).outputs) == {"label"}
    full = LocalClient(toy, expose_exit=True)
    out = full.infer(x).outputs
    np.testing.assert_array_equal(out["exit_index"], toy.predict(x).exit_index)
    assert out["exit_index"].dtype == np.int64 and out["probabilities"].dtype == np.float32
    assert set(full.infer(x, outputs=["exit_index"]).outputs) == {"exit_index"}
    with pytest.raises(InputError):
        LocalClient(toy).infer(x, outputs=["exit_index"])
    with pytest.raises(InputError):
        LocalClient(toy).infer(x.astype(np.int32))
    with pytest.raises(InputError):
        LocalClient(toy).infer(x[:, :8])
    assert full.ready() and full.metadata()["outputs"][-1]["name"] == "exit_index"
    # float64 input is cast like the server casts FP64
    as_f64 = LocalClient(toy).infer(x.astype(np.float64)).outputs["label"]
    np.testing.assert_array_equal(as_f64, default.outputs["label"])


def test_response_time_still_rises_with_the_exit() -> None:
    """The timing channel the audit measures survives the server: with a runtime whose compute grows
    by 0.5 ms per exit (run on the event loop, since its worst case is under the inline bound), the
    median round trip through the server rises with the exit, as it does in-process."""
    kwargs = {"seed": TOY_SEED, "exit_delay_s": 0.0005}
    runtime = ToyRuntime(**kwargs)  # type: ignore[arg-type]
    x = batch(300, seed=12)
    exits = runtime.predict(x).exit_index
    picks = np.concatenate([np.flatnonzero(exits == k)[:40] for k in range(runtime.num_exits)])
    assert all((exits[picks] == k).sum() >= 20 for k in range(runtime.num_exits))
    with ServerProcess(factory="mexit.serve.testing:ToyRuntime", factory_kwargs=kwargs, model_name="toy") as server, \
            OIPClient(server.url, "toy") as client:
        for i in picks[:20]:
            client.infer(x[i][None])  # warm-up
        rtt = np.array([min(client.infer(x[i][None]).rtt_ns for _ in range(2)) for i in picks])
    medians = [float(np.median(rtt[exits[picks] == k])) for k in range(runtime.num_exits)]
    assert medians[0] < medians[1] < medians[2], medians
