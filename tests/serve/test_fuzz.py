"""Hundreds of malformed requests: each gets a 4xx with ``{"error": ...}``, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mexit.serve import create_app
from mexit.serve.testing import ToyRuntime
from tests.serve.conftest import TOY_SEED, TestClient, batch, infer_body

INFER = "/v2/models/toy/infer"
MAX_BODY = 64 * 1024
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[TestClient]:
    app = create_app(ToyRuntime(seed=TOY_SEED), model_name="toy", max_body_bytes=MAX_BODY, max_batch=64,
                     expose_exit=True)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def assert_rejected(response: Any, allowed: tuple[int, ...] = (400, 404, 405, 413)) -> None:
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    payload = response.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    assert "Traceback" not in payload["error"]


def assert_still_serving(client: TestClient) -> None:
    x = batch(3)
    response = client.post(INFER, json=infer_body(x))
    assert response.status_code == 200
    labels = next(o for o in response.json()["outputs"] if o["name"] == "label")["data"]
    assert labels == ToyRuntime(seed=TOY_SEED).predict(x).labels.tolist()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=40,
)


@FUZZ
@given(body=st.binary(max_size=300))
def test_garbage_bytes(fuzz_client: TestClient, body: bytes) -> None:
    response = fuzz_client.post(INFER, content=body)
    assert_rejected(response)


@FUZZ
@given(payload=json_values)
def test_arbitrary_json_documents(fuzz_client: TestClient, payload: Any) -> None:
    assert_rejected(fuzz_client.post(INFER, content=json.dumps(payload).encode()))


TENSOR_KEYS = ("name", "shape", "datatype", "data", "parameters")


@FUZZ
@given(key=st.sampled_from((*TENSOR_KEYS, "<drop>")), value=json_values,
       drop=st.sampled_from(TENSOR_KEYS[:4]))  # "parameters" is optional, dropping it is fine
def test_one_tensor_field_replaced(fuzz_client: TestClient, key: str, value: Any, drop: str) -> None:
    body = infer_body(batch(2))
    tensor = body["inputs"][0]
    if key == "<drop>":
        del tensor[drop]
    else:
        if key == "parameters" and (value is None or isinstance(value, dict)):
            value = {**(value or {}), "binary_data_size": 8}  # valid unless it asks for binary data
        assume(value != tensor.get(key))
        tensor[key] = value
    assert_rejected(fuzz_client.post(INFER, content=json.dumps(body).encode()))


@FUZZ
@given(shape=st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=4),
       n_data=st.integers(min_value=0, max_value=200))
def test_random_shapes_and_sizes(fuzz_client: TestClient, shape: list[int], n_data: int) -> None:
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": [0.5] * n_data}]}
    valid = len(shape) == 2 and shape[1] == 16 and 1 <= shape[0] <= 64 and n_data == shape[0] * 16
    response = fuzz_client.post(INFER, content=json.dumps(body).encode())
    if valid:
        assert response.status_code == 200
    else:
        assert_rejected(response)


@FUZZ
@given(poison=st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "1.0", "", None, True, False, [], {},
                               [1.0], "0x10"]),
       position=st.integers(min_value=0, max_value=31), nested=st.booleans())
def test_poisoned_elements(fuzz_client: TestClient, poison: Any, position: int, nested: bool) -> None:
    body = infer_body(batch(2))
    data = body["inputs"][0]["data"]
    data[position] = poison
    if nested:
        body["inputs"][0]["data"] = [data[:16], data[16:]]
    assert_rejected(fuzz_client.post(INFER, content=json.dumps(body).encode()))


def binary_request(x: np.ndarray, *, size: int | None = None, cut: int = 0, header_delta: int = 0,
                   outputs: list[dict] | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-data request for ``x``, optionally lying about its size, cut short, or mis-split."""
    raw = x.astype("<f4").tobytes()
    body: dict[str, Any] = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                        "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
    if outputs is not None:
        body["outputs"] = outputs
    header = json.dumps(body).encode()
    content = header + raw[: len(raw) - cut]
    return content, {"Inference-Header-Content-Length": str(len(header) + header_delta)}


@FUZZ
@given(n=st.integers(min_value=1, max_value=8), size_delta=st.integers(min_value=-70, max_value=70),
       cut=st.integers(min_value=0, max_value=70), header_delta=st.integers(min_value=-40, max_value=5000))
def test_binary_sizes_and_header_lengths(fuzz_client: TestClient, n: int, size_delta: int, cut: int,
                                         header_delta: int) -> None:
    """A declared size that does not match shape x dtype, a body cut short, a header length anywhere."""
    x = batch(n)
    content, headers = binary_request(x, size=x.nbytes + size_delta, cut=min(cut, x.nbytes),
                                      header_delta=header_delta)
    response = fuzz_client.post(INFER, content=content, headers=headers)
    if size_delta == 0 and cut == 0 and header_delta == 0:
        assert response.status_code == 200
    else:
        assert_rejected(response)


@FUZZ
@given(outputs=st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["label", "probabilities", "exit_index", "logits", "", "LABEL"])},
    optional={"parameters": st.fixed_dictionaries({}, optional={"binary_data": json_values})}), max_size=4))
def test_binary_output_requests(fuzz_client: TestClient, outputs: list[dict]) -> None:
    """Unknown outputs asked for in binary and non-boolean binary_data flags are 400s; valid ones succeed."""
    content, headers = binary_request(batch(2), outputs=outputs)
    response = fuzz_client.post(INFER, content=content, headers=headers)
    known = {"label", "probabilities", "exit_index"}
    valid = all(o["name"] in known and type(o.get("parameters", {}).get("binary_data", False)) is bool
                for o in outputs)
    if valid:
        assert response.status_code == 200, response.text[:300]
    else:
        assert_rejected(response)


@FUZZ
@given(header=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
       | st.integers(min_value=-(2**70), max_value=2**70).map(str), body=st.binary(max_size=200))
def test_garbage_header_lengths(fuzz_client: TestClient, header: str, body: bytes) -> None:
    response = fuzz_client.post(INFER, content=body, headers={"Inference-Header-Content-Length": header})
    assert_rejected(response)


TABLE: list[tuple[str, str, Any, tuple[int, ...]]] = [
    # (method, path, body (bytes / JSON-able / None), allowed statuses)
    ("GET", INFER, None, (405,)),
    ("PUT", INFER, infer_body(batch(1)), (405,)),
    ("DELETE", "/v2/models/toy", None, (405,)),
    ("PATCH", "/v2/health/ready", None, (405,)),
    ("POST", "/v2", b"{}", (405,)),
    ("POST", "/v2/models/toy%2Fother/infer", infer_body(batch(1)), (404,)),
    ("POST", "/v2/models/TOY/infer", infer_body(batch(1)), (404,)),
    ("POST", "/v2/models/toy/versions/0/infer", infer_body(batch(1)), (404,)),
    ("POST", "/v2/models//infer", infer_body(batch(1)), (404,)),
    ("GET", "/v2/models/" + "a" * 5000, None, (404,)),
    ("GET", "/v3/health/live", None, (404,)),
    ("POST", INFER, b"", (400,)),
    ("POST", INFER, b"null", (400,)),
    ("POST", INFER, b"[" * 100_00, (400,)),
    ("POST", INFER, b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", (400,)),
    ("POST", INFER, b"\x00\x01\x02", (400,)),
    ("POST", INFER, "{\"inputs\": []}".encode("utf-16"), (400,)),
    ("POST", INFER, b" " * (MAX_BODY + 1), (413,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                 "data": [0.1] * (MAX_BODY // 2)}]}, (413,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [2**64, 16], "datatype": "FP32", "data": []}]}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [-1, 16], "datatype": "FP32", "data": [0] * 16}]}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [65, 16], "datatype": "FP32",
                                 "data": [0] * (65 * 16)}]}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "BYTES", "data": ["a"] * 16}]},
     (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0] * 17}]},
     (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                 "data": "AAAA"}]}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}],
                     "outputs": [{"name": "exit_index"}, {"name": "hidden_state"}]}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}],
                     "outputs": {"name": "label"}}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}],
                     "parameters": []}, (400,)),
    ("POST", INFER, {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 64}}]}, (400,)),  # declared, no binary part
]

BINARY_TABLE: list[tuple[str, bytes, dict[str, str], str]] = [
    # (case, body, headers, expected fragment of the error)
    ("size != shape x dtype", *binary_request(batch(1), size=60, cut=4), "needs 64"),
    ("header length beyond the body", *binary_request(batch(1), header_delta=65), "has only"),
    ("header length inside the JSON", *binary_request(batch(1), header_delta=-5), "not valid JSON"),
    ("binary output for an unknown output",
     *binary_request(batch(1), outputs=[{"name": "logits", "parameters": {"binary_data": True}}]), "'logits'"),
    ("binary part shorter than declared", *binary_request(batch(2), cut=1), "bytes after the JSON header"),
    ("negative header length", binary_request(batch(1))[0], {"Inference-Header-Content-Length": "-1"},
     "non-negative integer"),
]


def test_table_of_malformed_binary_requests(fuzz_client: TestClient) -> None:
    for case, body, headers, fragment in BINARY_TABLE:
        response = fuzz_client.post(INFER, content=body, headers=headers)
        assert_rejected(response, (400,))
        assert fragment in response.json()["error"], (case, response.json())
    assert_still_serving(fuzz_client)


def test_table_of_malformed_requests(fuzz_client: TestClient) -> None:
    for method, path, body, allowed in TABLE:
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        response = fuzz_client.request(method, path, content=content)
        assert_rejected(response, allowed)
    assert_still_serving(fuzz_client)


def test_valid_request_still_succeeds_after_fuzzing(fuzz_client: TestClient) -> None:
    """Runs after the fuzzers above (same module client): nothing they sent broke the app."""
    assert_still_serving(fuzz_client)
    x = np.zeros((64, 16), dtype=np.float32)
    assert fuzz_client.post(INFER, json=infer_body(x)).status_code == 200
