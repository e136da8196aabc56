"""Standard-client compatibility: a request built exactly as the OIP spec shows, and tritonclient when installed."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import numpy as np
import pytest

from mexit.serve import LocalClient, ServerProcess
from mexit.serve.testing import ToyRuntime
from tests.serve.conftest import TOY_SEED, batch


def _raw(server: ServerProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    parts = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def test_hand_built_spec_request(toy_server: ServerProcess) -> None:
    """The spec's example shape: id, inputs with name/shape/datatype/data, outputs by name; JSON throughout."""
    x = batch(2, seed=11)
    body = (
        '{\n  "id" : "42",\n  "inputs" : [\n    {\n      "name" : "input",\n      "shape" : [ 2, 16 ],\n'
        '      "datatype" : "FP32",\n      "data" : [ ' + ", ".join(repr(float(v)) for v in x.reshape(-1)) +
        ' ]\n    }\n  ],\n  "outputs" : [\n    {\n      "name" : "probabilities"\n    }\n  ]\n}'
    ).encode()
    status, headers, payload = _raw(toy_server, "POST", "/v2/models/toy/infer", body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert payload["id"] == "42" and payload["model_name"] == "toy"
    (out,) = payload["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [2, 4]
    expected = LocalClient(ToyRuntime(seed=TOY_SEED)).infer(x).outputs["probabilities"]
    np.testing.assert_array_equal(np.asarray(out["data"], dtype=np.float32).reshape(2, 4), expected)

    status, _, payload = _raw(toy_server, "GET", "/v2/models/toy")
    assert status == 200 and payload["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 16]}
    status, _, payload = _raw(toy_server, "POST", "/v2/models/toy/infer", b'{"inputs": 3}')
    assert status == 400 and set(payload) == {"error"}


@pytest.mark.parametrize("binary_data", [False, True])
def test_tritonclient_http(toy_server: ServerProcess, binary_data: bool) -> None:
    """The official client, with the binary tensor data extension on (its default) and off."""
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    url = toy_server.url.removeprefix("http://")
    client = httpclient.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("toy")
        server_meta = client.get_server_metadata()
        assert server_meta["name"] == "mexit" and "binary_tensor_data" in server_meta["extensions"]
        assert client.get_model_metadata("toy")["inputs"][0]["shape"] == [-1, 16]
        x = batch(8, seed=5)
        expected = LocalClient(ToyRuntime(seed=TOY_SEED)).infer(x).outputs
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary_data)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary_data)
                   for name in ("probabilities", "label")]
        result = client.infer("toy", [inp], outputs=outputs, request_id="7")
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected["probabilities"])
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.get_response()["id"] == "7"
        by_name = {o["name"]: o for o in result.get_response()["outputs"]}
        assert ("binary_data_size" in by_name["label"].get("parameters", {})) == binary_data
        # No outputs requested: tritonclient asks for every output in binary (binary_data_output).
        default = client.infer("toy", [inp])
        np.testing.assert_array_equal(default.as_numpy("label"), expected["label"])
        np.testing.assert_array_equal(default.as_numpy("probabilities"), expected["probabilities"])
        # Mixed: one output binary, the other JSON; an FP64 input cast by the server.
        fp64 = httpclient.InferInput("input", list(x.shape), "FP64")
        fp64.set_data_from_numpy(x.astype(np.float64), binary_data=binary_data)
        mixed = client.infer("toy", [fp64], outputs=[httpclient.InferRequestedOutput("label", binary_data=True),
                                                     httpclient.InferRequestedOutput("probabilities",
                                                                                     binary_data=False)])
        np.testing.assert_array_equal(mixed.as_numpy("label"), expected["label"])
        np.testing.assert_array_equal(mixed.as_numpy("probabilities"), expected["probabilities"])
        # An unknown output is refused with the server's message, and the server keeps serving.
        with pytest.raises(Exception, match="unknown or unexposed output 'logits'"):
            client.infer("toy", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
        np.testing.assert_array_equal(client.infer("toy", [inp]).as_numpy("label"), expected["label"])
    finally:
        client.close()


def test_plain_json_client_with_binary_response(toy_server: ServerProcess) -> None:
    """A stdlib-only client: JSON request, one binary output split with Inference-Header-Content-Length."""
    x = batch(3, seed=9)
    body = json.dumps({"inputs": [{"name": "input", "shape": [3, 16], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
    parts = urllib.parse.urlsplit(toy_server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/v2/models/toy/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        content = response.read()
        length = int(response.getheader("Inference-Header-Content-Length"))
        assert response.status == 200 and response.getheader("Content-Type") == "application/octet-stream"
    finally:
        conn.close()
    header = json.loads(content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 24}
    labels = np.frombuffer(content[length:], dtype="<i8")
    np.testing.assert_array_equal(labels, LocalClient(ToyRuntime(seed=TOY_SEED)).infer(x).outputs["label"])
