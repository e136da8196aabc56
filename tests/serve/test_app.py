"""The OIP application in-process (starlette TestClient): endpoints, outputs, exposure rules, errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from mexit import __version__
from mexit.errors import ConfigError
from mexit.serve.testing import ToyRuntime
from tests.serve.conftest import (
    TOY_SEED,
    AsyncRuntime,
    FailingRuntime,
    TestClient,
    WrongSizeRuntime,
    batch,
    infer_body,
)

INFER = "/v2/models/toy/infer"


def outputs_of(response_json: dict) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o["name"]: np.asarray(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"])
            for o in response_json["outputs"]}


# -- health and metadata --------------------------------------------------------------------------------
def test_health_endpoints(client: TestClient) -> None:
    live = client.get("/v2/health/live")
    ready = client.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert live.headers["content-type"] == "application/json"


def test_server_metadata(client: TestClient) -> None:
    assert client.get("/v2").json() == {"name": "mexit", "version": __version__, "extensions": []}


def test_model_metadata_lists_only_exposed_outputs(make_client: Callable[..., TestClient]) -> None:
    meta = make_client().get("/v2/models/toy").json()
    assert meta["name"] == "toy" and meta["versions"] == ["1"] and meta["platform"] == "mexit-early-exit"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}

    label_only = make_client(expose="label").get("/v2/models/toy").json()
    assert [o["name"] for o in label_only["outputs"]] == ["label"]
    with_exit = make_client(expose_exit=True, metadata_extra={"dataset": "digits"}).get("/v2/models/toy").json()
    assert [o["name"] for o in with_exit["outputs"]] == ["probabilities", "label", "exit_index"]
    assert with_exit["dataset"] == "digits"


def test_model_ready_and_versions(client: TestClient) -> None:
    assert client.get("/v2/models/toy/ready").json() == {"name": "toy", "ready": True}
    assert client.get("/v2/models/toy/versions/1/ready").status_code == 200
    assert client.get("/v2/models/toy/versions/1").json()["name"] == "toy"
    for path in ("/v2/models/other/ready", "/v2/models/toy/versions/2/ready", "/v2/models/toy/versions/2"):
        response = client.get(path)
        assert response.status_code == 404 and "error" in response.json(), path


def test_create_app_rejects_bad_configuration(toy: ToyRuntime) -> None:
    from mexit.serve import create_app

    with pytest.raises(ConfigError):
        create_app(toy, model_name="a/b")
    with pytest.raises(ConfigError):
        create_app(toy, model_name="toy", expose="logits")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        create_app(toy, model_name="toy", metadata_extra={"inputs": []})


# -- inference ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True])
def test_infer_equals_in_process_prediction(client: TestClient, toy: ToyRuntime, nested: bool) -> None:
    x = batch(32)
    response = client.post(INFER, json=infer_body(x, nested=nested, id="req-42"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "toy" and body["model_version"] == "1" and body["id"] == "req-42"
    out = outputs_of(body)
    expected = toy.predict(x)
    assert set(out) == {"probabilities", "label"}  # no exit_index by default
    np.testing.assert_array_equal(out["probabilities"], expected.probs)  # bit-exact through JSON
    np.testing.assert_array_equal(out["label"], expected.labels)
    assert out["probabilities"].shape == (32, 4) and out["label"].shape == (32,)
    assert len(np.unique(expected.exit_index)) > 1  # the batch really mixes exits


def test_infer_image_shaped_nested_data(make_client: Callable[..., TestClient]) -> None:
    runtime = ToyRuntime(input_shape=(3, 4, 4), seed=1)
    client = make_client(runtime)
    x = batch(5, (3, 4, 4))
    for nested in (False, True):
        out = outputs_of(client.post(INFER, json=infer_body(x, nested=nested)).json())
        np.testing.assert_array_equal(out["label"], runtime.predict(x).labels)


def test_versioned_infer_and_fp64_input(client: TestClient, toy: ToyRuntime) -> None:
    x = batch(3)
    body = infer_body(x)
    body["inputs"][0]["datatype"] = "FP64"
    response = client.post("/v2/models/toy/versions/1/infer", json=body)
    assert response.status_code == 200
    np.testing.assert_array_equal(outputs_of(response.json())["label"], toy.predict(x).labels)


def test_no_id_no_id_in_response(client: TestClient) -> None:
    assert "id" not in client.post(INFER, json=infer_body(batch(1))).json()


def test_exit_index_only_when_exposed(make_client: Callable[..., TestClient], toy: ToyRuntime) -> None:
    x = batch(40)
    hidden = outputs_of(make_client().post(INFER, json=infer_body(x)).json())
    assert "exit_index" not in hidden
    shown = outputs_of(make_client(expose_exit=True).post(INFER, json=infer_body(x)).json())
    np.testing.assert_array_equal(shown["exit_index"], toy.predict(x).exit_index)


def test_label_only_deployment_hides_probabilities(make_client: Callable[..., TestClient], toy: ToyRuntime) -> None:
    client = make_client(expose="label")
    x = batch(4)
    out = outputs_of(client.post(INFER, json=infer_body(x)).json())
    assert set(out) == {"label"}
    np.testing.assert_array_equal(out["label"], toy.predict(x).labels)
    asked = client.post(INFER, json=infer_body(x, outputs=[{"name": "probabilities"}]))
    assert asked.status_code == 400 and "probabilities" in asked.json()["error"]


def test_requested_outputs(make_client: Callable[..., TestClient]) -> None:
    client = make_client(expose_exit=True)
    x = batch(2)
    only_label = client.post(INFER, json=infer_body(x, outputs=[{"name": "label"}])).json()
    assert [o["name"] for o in only_label["outputs"]] == ["label"]
    order = client.post(INFER, json=infer_body(
        x, outputs=[{"name": "exit_index"}, {"name": "label", "parameters": {"binary_data": False}}])).json()
    assert [o["name"] for o in order["outputs"]] == ["exit_index", "label"]
    assert len(client.post(INFER, json=infer_body(x, outputs=[])).json()["outputs"]) == 3
    unknown = client.post(INFER, json=infer_body(x, outputs=[{"name": "logits"}]))
    assert unknown.status_code == 400 and "logits" in unknown.json()["error"]


def test_predict_async_is_awaited_when_present(make_client: Callable[..., TestClient]) -> None:
    runtime = AsyncRuntime(seed=TOY_SEED)
    client = make_client(runtime)
    assert client.post(INFER, json=infer_body(batch(2))).status_code == 200
    assert (runtime.async_calls, runtime.sync_calls) == (1, 0)


def test_no_exit_information_in_headers(make_client: Callable[..., TestClient], toy: ToyRuntime) -> None:
    """Responses for samples leaving at different exits carry the same header names and no extras."""
    client = make_client()
    x = batch(200)
    exits = toy.predict(x).exit_index
    seen = set()
    for k in range(toy.num_exits):
        sample = x[np.flatnonzero(exits == k)[0]][None]
        response = client.post(INFER, json=infer_body(sample))
        seen.add(tuple(sorted(response.headers.keys())))
    assert seen == {("content-length", "content-type")}


# -- errors --------------------------------------------------------------------------------------------------
def _post(client: TestClient, body: object) -> tuple[int, str]:
    response = client.post(INFER, content=json.dumps(body).encode())
    payload = response.json()
    assert set(payload) == {"error"}, payload
    return response.status_code, payload["error"]


def test_error_messages_name_expected_and_given(client: TestClient) -> None:
    good = infer_body(batch(2))

    def variant(**changes: object) -> dict:
        body = json.loads(json.dumps(good))
        body["inputs"][0].update(changes)
        return body

    cases = {
        "input name": (variant(name="x"), ["'input'", "'x'"]),
        "datatype": (variant(datatype="INT32"), ["FP32", "INT32"]),
        "shape rank": (variant(shape=[2, 4, 4]), ["[n, 16]", "[2, 4, 4]"]),
        "feature dim": (variant(shape=[2, 15]), ["[n, 16]", "[2, 15]"]),
        "batch zero": (variant(shape=[0, 16], data=[]), ["between 1 and 1024", "0"]),
        "element count": (variant(data=[0.0] * 31), ["32 numbers", "31"]),
        "string NaN": (variant(data=["NaN"] + [0.0] * 31), ["numbers", "strings"]),
        "boolean": (variant(data=[True] + [0.0] * 31), ["numbers", "booleans"]),
        "null": (variant(data=[None] + [0.0] * 31), ["numbers", "nulls"]),
        "overflow": (variant(data=[1e300] + [0.0] * 31), ["finite", "float32"]),
        "ragged": (variant(data=[[0.0] * 16, [0.0] * 15]), ["nested to [2, 16]"]),
        "too deep": (variant(data=[[[0.0]] * 16] * 2), ["nested to [2, 16]"]),
        "two inputs": ({"inputs": [good["inputs"][0]] * 2}, ["exactly one", "a list of 2"]),
        "no inputs": ({"id": "1"}, ["exactly one", "null"]),
        "not an object": ([1, 2, 3], ["JSON object", "a list"]),
        "id type": ({**good, "id": 5}, ["'id' must be a string"]),
        "binary extension": (variant(parameters={"binary_data_size": 128}), ["binary tensor data extension"]),
    }
    for name, (body, fragments) in cases.items():
        status, message = _post(client, body)
        assert status == 400, name
        for fragment in fragments:
            assert fragment in message, (name, message)


def test_max_batch(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_batch=4)
    assert client.post(INFER, json=infer_body(batch(4))).status_code == 200
    status, message = _post(client, infer_body(batch(5)))
    assert status == 400 and "between 1 and 4" in message


def test_huge_declared_shape_is_rejected_cheaply(client: TestClient) -> None:
    body = {"inputs": [{"name": "input", "shape": [10**15, 16], "datatype": "FP32", "data": [0.0]}]}
    status, message = _post(client, body)
    assert status == 400 and "between 1 and 1024" in message


def test_malformed_json(client: TestClient) -> None:
    response = client.post(INFER, content=b'{"inputs": [')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_unknown_path_and_model_are_404(client: TestClient) -> None:
    for path in ("/v2/nope", "/v1/models/toy:predict", "/"):
        response = client.get(path)
        assert response.status_code == 404 and "no such endpoint" in response.json()["error"]
    response = client.post("/v2/models/other/infer", json=infer_body(batch(1)))
    assert response.status_code == 404 and "'toy'" in response.json()["error"]


def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    for method, path in (("GET", INFER), ("POST", "/v2/health/live"), ("DELETE", "/v2/models/toy"),
                         ("PUT", "/v2")):
        response = client.request(method, path)
        assert response.status_code == 405, (method, path)
        assert "not allowed" in response.json()["error"] and response.headers["allow"]


def test_body_too_large_by_content_length(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=1000)
    response = client.post(INFER, content=b" " * 1001)
    assert response.status_code == 413 and "1000 bytes" in response.json()["error"]
    assert client.post(INFER, json=infer_body(batch(1))).status_code == 200  # 16 floats fit


def test_body_too_large_while_streaming(make_client: Callable[..., TestClient]) -> None:
    """A chunked body (no Content-Length) is cut off once it passes the limit."""
    client = make_client(max_body_bytes=1000)

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 100

    response = client.post(INFER, content=chunks())
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]


def test_runtime_failure_is_generic_500_and_server_survives(make_client: Callable[..., TestClient],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(FailingRuntime(seed=TOY_SEED))
    with caplog.at_level("ERROR", logger="mexit.serve.app"):
        response = client.post(INFER, json=infer_body(batch(2)))
    assert response.status_code == 500
    message = response.json()["error"]
    assert "kaboom" not in message and "secret" not in message and "Traceback" not in response.text
    assert "kaboom" in caplog.text  # the details went to the log
    assert client.get("/v2/health/live").status_code == 200


def test_runtime_returning_wrong_batch_is_500(make_client: Callable[..., TestClient]) -> None:
    response = make_client(WrongSizeRuntime(seed=TOY_SEED)).post(INFER, json=infer_body(batch(3)))
    assert response.status_code == 500 and set(response.json()) == {"error"}


def test_runtime_input_error_is_400(make_client: Callable[..., TestClient]) -> None:
    """The runtime's own validation (here: force a mismatch the protocol layer lets through) maps to 400."""

    class Picky(ToyRuntime):
        def predict(self, x, *, full_depth=False, force_exit=None):  # type: ignore[no-untyped-def]
            from mexit.errors import InputError

            raise InputError("input looks like raw pixels; normalise it")

    response = make_client(Picky()).post(INFER, json=infer_body(batch(1)))
    assert response.status_code == 400 and "raw pixels" in response.json()["error"]


def test_guarded_style_runtime_gets_the_request_arrival_time(make_client: Callable[..., TestClient]) -> None:
    import time

    from mexit.runtime.types import Prediction

    class Guarded(ToyRuntime):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            self.arrivals: list[tuple[int | None, int]] = []

        async def predict_async(self, x: np.ndarray, *, arrival_ns: int | None = None) -> Prediction:
            self.arrivals.append((arrival_ns, time.perf_counter_ns()))
            return self.predict(x)

    runtime = Guarded(seed=TOY_SEED)
    before = time.perf_counter_ns()
    assert make_client(runtime).post(INFER, json=infer_body(batch(1))).status_code == 200
    ((arrival, called),) = runtime.arrivals
    assert isinstance(arrival, int) and before <= arrival <= called


def test_inline_prediction_gives_the_same_answers(make_client: Callable[..., TestClient], toy: ToyRuntime) -> None:
    x = batch(10)
    out = outputs_of(make_client(predict_inline=True).post(INFER, json=infer_body(x)).json())
    np.testing.assert_array_equal(out["probabilities"], toy.predict(x).probs)


def test_binary_tensor_extension_header_is_refused_clearly(client: TestClient) -> None:
    response = client.post(INFER, content=b'{"inputs": []}\x00\x00\x80?',
                           headers={"Inference-Header-Content-Length": "14"})
    assert response.status_code == 400 and "binary tensor data extension" in response.json()["error"]
