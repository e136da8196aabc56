"""Request decoding and encoding rules of mexit.serve.protocol, with orjson and with the stdlib json fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mexit.errors import InputError, UserError
from mexit.runtime.types import Prediction
from mexit.serve import protocol
from mexit.serve.client import decode_infer_response, encode_infer_request

SHAPE = (2, 3)


_DEFAULT: object = object()


def tensor(data: object, *, shape: object = _DEFAULT, datatype: str = "FP32") -> dict:
    return {"name": "input", "shape": [1, *SHAPE] if shape is _DEFAULT else shape, "datatype": datatype,
            "data": data}


def decode(t: dict, max_batch: int = 8) -> np.ndarray:
    return protocol.decode_input_tensor(t, input_shape=SHAPE, max_batch=max_batch)


def test_flat_and_nested_decode_to_the_same_float32_array() -> None:
    values = [[[1, 2.5, -3], [4, 5, 6e-3]]]
    flat = decode(tensor([1, 2.5, -3, 4, 5, 6e-3]))
    nested = decode(tensor(values))
    assert flat.dtype == np.float32 and flat.flags.c_contiguous and flat.shape == (1, 2, 3)
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, np.asarray(values, dtype=np.float32))


def test_partially_nested_data_is_rejected() -> None:
    with pytest.raises(InputError, match="nested to"):
        decode(tensor([[1, 2, 3, 4, 5, 6]]))  # nested to the batch axis only


@pytest.mark.parametrize("datatype", ["FP64", "FP16"])
def test_other_float_datatypes_are_cast(datatype: str) -> None:
    assert decode(tensor([0.5] * 6, datatype=datatype)).dtype == np.float32


@pytest.mark.parametrize("datatype", ["INT64", "UINT8", "BOOL", "BYTES", "fp32", None, 32])
def test_non_float_datatypes_are_rejected(datatype: object) -> None:
    with pytest.raises(InputError, match="datatype must be FP32"):
        decode(tensor([0] * 6, datatype=datatype))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [[True, 2, 3], [1.0, 2, 3], [-1, 2, 3], ["1", 2, 3], [1, 2], 6, None])
def test_bad_shapes(shape: object) -> None:
    with pytest.raises(InputError):
        decode(tensor([0.0] * 6, shape=shape))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3.5e38, 10**40, -(10**400)])
def test_non_finite_or_out_of_range_values(value: object) -> None:
    with pytest.raises(InputError, match="finite"):
        decode(tensor([value, 0, 0, 0, 0, 0]))


def test_float32_max_itself_is_fine() -> None:
    big = float(np.finfo(np.float32).max)
    assert decode(tensor([big, -big, 0, 0, 0, 0]))[0, 0, 0] == np.float32(big)


def test_huge_integers_in_data_are_finite_if_in_range() -> None:
    assert decode(tensor([2**63 - 1, 0, 0, 0, 0, 0]))[0, 0, 0] == np.float32(2**63)


def test_select_outputs_dedupes_and_validates() -> None:
    exposed = ("probabilities", "label")
    assert protocol.select_outputs(None, exposed) == exposed
    assert protocol.select_outputs([{"name": "label"}, {"name": "label"}], exposed) == ("label",)
    for bad in ({"name": "label"}, ["label"], [{"name": 3}], [{"name": "label", "parameters": []}]):
        with pytest.raises(InputError):
            protocol.select_outputs(bad, exposed)


def test_error_messages_are_bounded() -> None:
    with pytest.raises(InputError) as info:
        decode({"name": "x" * 10_000, "shape": [1, 2, 3], "datatype": "FP32", "data": []})
    assert len(str(info.value)) < 300


def _pred() -> Prediction:
    probs = np.array([[0.1, 0.9], [0.7, 0.3]], dtype=np.float32)
    return Prediction(probs, np.array([1, 0]), np.array([2, 0]), np.array([5, 3]))


@pytest.mark.parametrize("use_orjson", [True, False])
def test_response_round_trip_is_exact(monkeypatch: pytest.MonkeyPatch, use_orjson: bool) -> None:
    if not use_orjson:
        monkeypatch.setattr(protocol, "_orjson", None)
    elif protocol._orjson is None:
        pytest.skip("orjson is not installed")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=50).astype(np.float32)
    pred = Prediction(probs, probs.argmax(1).astype(np.int64), np.zeros(50, np.int64), np.zeros(50, np.int64))
    arrays = protocol.prediction_outputs(pred, ("probabilities", "label"))
    body = protocol.dumps({"model_name": "m", "outputs": protocol.response_outputs(arrays)})
    decoded = decode_infer_response(body)
    np.testing.assert_array_equal(decoded["probabilities"], probs)
    assert decoded["label"].dtype == np.int64 and decoded["probabilities"].dtype == np.float32


@pytest.mark.parametrize("use_orjson", [True, False])
def test_request_round_trip_is_exact(monkeypatch: pytest.MonkeyPatch, use_orjson: bool) -> None:
    if not use_orjson:
        monkeypatch.setattr(protocol, "_orjson", None)
    x = np.random.default_rng(1).standard_normal((4, *SHAPE)).astype(np.float32) * 1e3
    body, header_length = encode_infer_request(x, outputs=["label"], request_id="7")
    assert header_length is None
    parsed = protocol.loads(body)
    assert parsed["id"] == "7" and parsed["outputs"] == [{"name": "label"}]
    req = protocol.decode_infer_request(parsed, input_shape=SHAPE, exposed=("label",), max_batch=8)
    np.testing.assert_array_equal(req.x, x)


def test_stdlib_json_fallback_rejects_nan_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """json.loads accepts NaN/Infinity tokens that orjson refuses; validation must still catch them."""
    monkeypatch.setattr(protocol, "_orjson", None)
    payload = protocol.loads(b'{"inputs": [{"name": "input", "shape": [1, 2, 3], "datatype": "FP32", '
                             b'"data": [NaN, 1, 2, 3, 4, Infinity]}]}')
    with pytest.raises(InputError, match="finite"):
        protocol.decode_infer_request(payload, input_shape=SHAPE, exposed=("label",), max_batch=8)


def test_decode_response_rejects_garbage() -> None:
    for body in (b"{}", b"[]", json.dumps({"outputs": [{"name": "x", "datatype": "NOPE", "shape": [1],
                                                          "data": [1]}]}).encode(), b"\xff"):
        with pytest.raises(UserError, match="malformed inference response"):
            decode_infer_response(body, "http://x")


@pytest.mark.parametrize("use_orjson", [True, False])
def test_binary_request_round_trip_is_exact(monkeypatch: pytest.MonkeyPatch, use_orjson: bool) -> None:
    if not use_orjson:
        monkeypatch.setattr(protocol, "_orjson", None)
    x = np.random.default_rng(2).standard_normal((3, *SHAPE)).astype(np.float32)
    body, header_length = encode_infer_request(x, outputs=["label"], binary=True)
    assert header_length is not None and len(body) == header_length + x.nbytes
    header, binary = protocol.split_binary_body(body, str(header_length))
    parsed = protocol.loads(header)
    assert parsed["inputs"][0]["parameters"] == {"binary_data_size": x.nbytes} and "data" not in parsed["inputs"][0]
    assert parsed["outputs"] == [{"name": "label", "parameters": {"binary_data": True}}]
    req = protocol.decode_infer_request(parsed, input_shape=SHAPE, exposed=("label",), max_batch=8, binary=binary)
    np.testing.assert_array_equal(req.x, x)
    assert req.x.dtype == np.float32 and req.x.flags.c_contiguous and req.x.flags.writeable
    assert req.binary_outputs == frozenset({"label"})
    # No outputs named: the request-level binary_data_output asks for every output in binary.
    body, header_length = encode_infer_request(x, binary=True)
    parsed = protocol.loads(protocol.split_binary_body(body, str(header_length))[0])
    assert parsed["parameters"] == {"binary_data_output": True}


def test_binary_input_is_read_little_endian_and_checked() -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, *SHAPE)
    t = {"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "parameters": {"binary_data_size": 24}}
    np.testing.assert_array_equal(
        protocol.decode_input_tensor(t, input_shape=SHAPE, max_batch=8, binary=x.astype("<f4").tobytes()), x)
    big_endian = x.astype(">f4").tobytes()
    assert not np.array_equal(protocol.decode_input_tensor(t, input_shape=SHAPE, max_batch=8, binary=big_endian), x)
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="finite"):
        protocol.decode_input_tensor(t, input_shape=SHAPE, max_batch=8, binary=nan.tobytes())
    fp64 = {**t, "datatype": "FP64", "parameters": {"binary_data_size": 48}}
    huge = np.full((1, *SHAPE), 1e300).tobytes()  # beyond float32: inf after the cast, refused
    with pytest.raises(InputError, match="finite"):
        protocol.decode_input_tensor(fp64, input_shape=SHAPE, max_batch=8, binary=huge)
    for size, fragment in ((20, "needs 24"), (-1, "non-negative"), (True, "non-negative"), ("24", "non-negative")):
        bad = {**t, "parameters": {"binary_data_size": size}}
        with pytest.raises(InputError, match=fragment):
            protocol.decode_input_tensor(bad, input_shape=SHAPE, max_batch=8, binary=x.tobytes())
    with pytest.raises(InputError, match="bytes after the JSON header"):
        protocol.decode_input_tensor(t, input_shape=SHAPE, max_batch=8, binary=x.tobytes() + b"\0")
    with pytest.raises(InputError, match=r"no parameters\.binary_data_size"):
        protocol.decode_input_tensor(tensor([0.0] * 6), input_shape=SHAPE, max_batch=8, binary=b"\0" * 4)


@pytest.mark.parametrize(("value", "fragment"), [
    ("-1", "non-negative integer"), ("+3", "non-negative integer"), ("1_0", "non-negative integer"),
    ("", "non-negative integer"), ("\u0663", "non-negative integer"), ("99", "has only 10 bytes"),
    ("9" * 40, "non-negative integer"),
])
def test_split_binary_body_rejects_bad_header_lengths(value: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        protocol.split_binary_body(b"0123456789", value)


def test_split_binary_body() -> None:
    header, binary = protocol.split_binary_body(b"{}abcd", " 2 ")
    assert header == b"{}" and bytes(binary) == b"abcd"
    header, binary = protocol.split_binary_body(b"{}", None)
    assert header == b"{}" and len(binary) == 0


def test_requested_outputs_binary_flags() -> None:
    exposed = ("probabilities", "label")
    assert protocol.requested_outputs(None, exposed, binary_default=True) == (exposed, frozenset(exposed))
    assert protocol.requested_outputs([], exposed) == (exposed, frozenset())
    names, binary = protocol.requested_outputs(
        [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}], exposed)
    assert names == ("label", "probabilities") and binary == frozenset({"label"})
    with pytest.raises(InputError, match="true or false"):
        protocol.requested_outputs([{"name": "label", "parameters": {"binary_data": 1}}], exposed)
    with pytest.raises(InputError, match="unknown or unexposed"):
        protocol.requested_outputs([{"name": "exit_index", "parameters": {"binary_data": True}}], exposed)


@pytest.mark.parametrize("use_orjson", [True, False])
def test_binary_response_round_trip_is_exact(monkeypatch: pytest.MonkeyPatch, use_orjson: bool) -> None:
    if not use_orjson:
        monkeypatch.setattr(protocol, "_orjson", None)
    probs = np.random.default_rng(3).dirichlet(np.ones(5), size=7).astype(np.float32)
    pred = Prediction(probs, probs.argmax(1).astype(np.int64), np.arange(7, dtype=np.int64) % 3,
                      np.zeros(7, np.int64))
    arrays = protocol.prediction_outputs(pred, ("probabilities", "label", "exit_index"))
    body, length = protocol.encode_infer_response({"model_name": "m", "id": "x"}, arrays, {"probabilities", "label"})
    assert length is not None and len(body) == length + probs.nbytes + 7 * 8
    out = decode_infer_response(body, "u", length)
    np.testing.assert_array_equal(out["probabilities"], probs)
    np.testing.assert_array_equal(out["label"], pred.labels)
    np.testing.assert_array_equal(out["exit_index"], pred.exit_index)  # the JSON one, between binary ones
    json_only, none = protocol.encode_infer_response({"model_name": "m"}, arrays)
    assert none is None and "binary_data_size" not in json_only.decode()
    with pytest.raises(UserError, match="malformed"):
        decode_infer_response(body[:-1], "u", length)  # the last blob is cut short
    with pytest.raises(UserError, match="malformed"):
        decode_infer_response(body, "u", len(body) + 1)
