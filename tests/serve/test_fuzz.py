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
]


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
