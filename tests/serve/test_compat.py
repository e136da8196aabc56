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


def test_tritonclient_http(toy_server: ServerProcess) -> None:
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    url = toy_server.url.removeprefix("http://")
    client = httpclient.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("toy")
        assert client.get_server_metadata()["name"] == "mexit"
        assert client.get_model_metadata("toy")["inputs"][0]["shape"] == [-1, 16]
        x = batch(8, seed=5)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "label")]
        result = client.infer("toy", [inp], outputs=outputs, request_id="7")
        expected = LocalClient(ToyRuntime(seed=TOY_SEED)).infer(x).outputs
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected["probabilities"])
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.get_response()["id"] == "7"
        # No outputs requested: tritonclient asks for binary outputs, which this server answers in JSON.
        default = client.infer("toy", [inp])
        np.testing.assert_array_equal(default.as_numpy("label"), expected["label"])
        # Binary *input* is refused with a clear message rather than misread.
        binary = httpclient.InferInput("input", list(x.shape), "FP32")
        binary.set_data_from_numpy(x, binary_data=True)
        with pytest.raises(Exception, match="binary tensor data extension is not supported"):
            client.infer("toy", [binary])
    finally:
        client.close()
