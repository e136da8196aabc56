"""The Open Inference Protocol (KServe V2) as mexit speaks it: names, metadata, request decoding.

Shared by the server (:mod:`mexit.serve.app`) and both clients (:mod:`mexit.serve.client`) so that a
local runtime and a remote server expose *the same* outputs under the same names, and an attack cannot
tell (or care) which one it queries.

Choices made where the protocol leaves room (see ``docs``/the module docstring of ``app``):

* One input tensor, ``"input"``, datatype ``FP32``, shape ``[-1, *input_shape]`` (batch axis first).
  ``FP64`` and ``FP16`` are accepted and cast to float32 (values outside float32's range are
  rejected). Integer, ``BOOL`` and ``BYTES`` inputs are rejected: the model takes normalised float
  features, so an integer tensor is almost always raw pixels sent by mistake, and silently casting
  it would answer garbage.
* ``"data"`` may be flat (row-major) or nested to exactly the declared shape; every element must be a
  JSON number (no strings such as ``"NaN"``, no booleans, no nulls) and finite.
* Outputs: ``"probabilities"`` FP32 ``[n, C]`` (only when the deployment exposes probabilities),
  ``"label"`` INT64 ``[n]`` (always), ``"exit_index"`` INT64 ``[n]`` (only with ``expose_exit``: that
  is the paper's Adversary 1, never the default).
* The binary tensor data extension (as Triton and ``tritonclient`` use it) is supported both ways:
  an input whose ``parameters`` carry ``binary_data_size`` takes its elements from the bytes after
  the JSON header (whose length the ``Inference-Header-Content-Length`` HTTP header gives), read
  straight into a numpy buffer; an output asked for with ``parameters.binary_data`` (or every output,
  with the request parameter ``binary_data_output``) comes back as raw little-endian bytes after the
  JSON header of the response. The server metadata lists ``binary_tensor_data``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mexit.errors import ConfigError, InputError
from mexit.runtime.types import Prediction

try:  # a dependency: parses ~3x and writes numpy arrays ~10x faster than json (the fallback keeps working)
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _orjson = None

INPUT_NAME = "input"
PLATFORM = "mexit-early-exit"
SERVER_NAME = "mexit"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"
OUTPUT_EXIT = "exit_index"

Expose = Literal["probabilities", "label"]

#: OIP datatype name -> numpy dtype, for decoding responses and encoding requests.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
#: The protocol extensions this server implements (listed in the server metadata).
EXTENSIONS = ("binary_tensor_data",)
#: The HTTP header giving the length of the JSON part of a body that carries binary tensor data.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Input datatypes the server accepts (cast to float32); everything else is a 400.
ACCEPTED_INPUT_DATATYPES = ("FP32", "FP64", "FP16")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def dumps(obj: Any) -> bytes:
    """JSON-encode ``obj`` (numpy arrays included) to bytes, with orjson when it is installed."""
    if _orjson is not None:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ``ValueError`` on malformed input (both backends)."""
    if _orjson is not None:
        return _orjson.loads(data)
    return json.loads(data)


def flat_data(arr: np.ndarray) -> Any:
    """Row-major tensor data ready for :func:`dumps`: the flat array itself for orjson, a list otherwise."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return flat if _orjson is not None else flat.tolist()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def exposed_outputs(expose: Expose, expose_exit: bool) -> tuple[str, ...]:
    """Names of the outputs a deployment returns, in response order."""
    if expose not in ("probabilities", "label"):
        raise ConfigError(f"expose must be 'probabilities' or 'label', got {expose!r}")
    names: list[str] = []
    if expose == "probabilities":
        names.append(OUTPUT_PROBABILITIES)
    names.append(OUTPUT_LABEL)
    if expose_exit:
        names.append(OUTPUT_EXIT)
    return tuple(names)


def output_metadata(names: Sequence[str], num_classes: int) -> list[dict[str, Any]]:
    """``$metadata_tensor`` entries for the exposed outputs."""
    table = {
        OUTPUT_PROBABILITIES: {"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, int(num_classes)]},
        OUTPUT_LABEL: {"name": OUTPUT_LABEL, "datatype": "INT64", "shape": [-1]},
        OUTPUT_EXIT: {"name": OUTPUT_EXIT, "datatype": "INT64", "shape": [-1]},
    }
    return [table[name] for name in names]


def model_metadata(
    *,
    model_name: str,
    model_version: str,
    input_shape: Sequence[int],
    num_classes: int,
    outputs: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``$metadata_model_response`` object; ``extra`` adds non-standard keys (dataset, class names)."""
    meta: dict[str, Any] = {
        "name": model_name,
        "versions": [model_version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *(int(d) for d in input_shape)]}],
        "outputs": output_metadata(outputs, num_classes),
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ConfigError(f"metadata_extra key {key!r} would overwrite the standard model metadata field; "
                              f"rename it")
        meta[key] = value
    return meta


def prediction_outputs(pred: Prediction, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays behind each requested output name, with the protocol's dtypes."""
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        if name == OUTPUT_PROBABILITIES:
            arrays[name] = np.ascontiguousarray(pred.probs, dtype=np.float32)
        elif name == OUTPUT_LABEL:
            arrays[name] = np.ascontiguousarray(pred.labels, dtype=np.int64)
        elif name == OUTPUT_EXIT:
            arrays[name] = np.ascontiguousarray(pred.exit_index, dtype=np.int64)
        else:  # pragma: no cover - names are validated before prediction
            raise KeyError(name)
    return arrays


_OUTPUT_DATATYPES = {OUTPUT_PROBABILITIES: "FP32", OUTPUT_LABEL: "INT64", OUTPUT_EXIT: "INT64"}


def response_outputs(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """``$response_output`` objects (flat row-major data) for :func:`dumps`."""
    return [{"name": name, "datatype": _OUTPUT_DATATYPES[name], "shape": list(arr.shape), "data": flat_data(arr)}
            for name, arr in arrays.items()]


def encode_infer_response(
    response: Mapping[str, Any], arrays: Mapping[str, np.ndarray], binary: Collection[str] = ()
) -> tuple[bytes, int | None]:
    """The body of an ``$inference_response`` and, when any output is binary, the length of its JSON header.

    Outputs named in ``binary`` carry ``parameters.binary_data_size`` instead of ``data``, and their
    raw little-endian bytes follow the JSON header in response order (the binary tensor data extension).
    The length is ``None`` for an all-JSON body, which then needs no ``Inference-Header-Content-Length``.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in arrays.items():
        entry: dict[str, Any] = {"name": name, "datatype": _OUTPUT_DATATYPES[name], "shape": list(arr.shape)}
        if name in binary:
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = flat_data(arr)
        outputs.append(entry)
    header = dumps({**response, "outputs": outputs})
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def split_binary_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """``(json_header, binary_part)`` of a request body, given its ``Inference-Header-Content-Length`` value.

    Without the header the whole body is JSON and the binary part is empty. The binary part is a view
    of ``body`` (no copy), which :func:`decode_input_tensor` reads with ``np.frombuffer``.
    """
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    # isdigit + isascii, not int(): int() also takes "+5", "5_0" and non-ASCII digits.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InputError(f"{HEADER_LENGTH} must be a non-negative integer (the byte length of the JSON header), "
                         f"got {short_repr(header_length)}")
    length = int(text)
    if length > len(body):
        raise InputError(f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes; it must give the "
                         f"byte length of the JSON header that starts the body")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def select_outputs(requested: Any, exposed: Sequence[str]) -> tuple[str, ...]:
    """Validate the request's optional ``"outputs"`` list against what this deployment exposes."""
    return requested_outputs(requested, exposed)[0]


def requested_outputs(
    requested: Any, exposed: Sequence[str], *, binary_default: bool = False
) -> tuple[tuple[str, ...], frozenset[str]]:
    """``(names, binary_names)`` for the request's optional ``"outputs"`` list.

    An output is returned as binary data when its ``parameters.binary_data`` is true, or, when it says
    nothing, when the request parameter ``binary_data_output`` (``binary_default``) is true. An unknown
    or unexposed name is an :class:`InputError`, binary or not.
    """
    if requested is None or (isinstance(requested, list) and not requested):
        return tuple(exposed), frozenset(exposed) if binary_default else frozenset()
    if not isinstance(requested, list):
        raise InputError(f"'outputs' must be a list of {{\"name\": ...}} objects, got {_jtype(requested)}")
    names: list[str] = []
    binary: set[str] = set()
    for i, item in enumerate(requested):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputError(f"outputs[{i}] must be an object with a string 'name', got {short_repr(item)}")
        params = item.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InputError(f"outputs[{i}].parameters must be an object, got {_jtype(params)}")
        name = item["name"]
        if name not in exposed:
            raise InputError(f"unknown or unexposed output {short_repr(name)}; this deployment exposes "
                             f"{list(exposed)}")
        as_binary = (params or {}).get("binary_data", binary_default)
        if type(as_binary) is not bool:
            raise InputError(f"outputs[{i}].parameters.binary_data must be true or false, got {short_repr(as_binary)}")
        if name not in names:
            names.append(name)
            if as_binary:
                binary.add(name)
    return tuple(names), frozenset(binary)


@dataclass(frozen=True)
class InferRequest:
    """A decoded, validated inference request."""

    x: np.ndarray  # (n, *input_shape) float32, finite, C-contiguous
    outputs: tuple[str, ...]
    id: str | None
    binary_outputs: frozenset[str] = frozenset()  # the outputs to return as binary tensor data


def decode_infer_request(
    payload: Any,
    *,
    input_shape: Sequence[int],
    exposed: Sequence[str],
    max_batch: int,
    binary: bytes | memoryview = b"",
) -> InferRequest:
    """Validate a parsed ``$inference_request`` and turn it into a float32 batch.

    ``binary`` is the part of the body after the JSON header (binary tensor data extension), empty
    for a JSON-only request. Raises :class:`InputError` naming what was expected and what was given.
    """
    if not isinstance(payload, dict):
        raise InputError(f"the request body must be a JSON object with an 'inputs' list, got {_jtype(payload)}")
    req_id = payload.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InputError(f"'id' must be a string, got {_jtype(req_id)}")
    params = payload.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InputError(f"'parameters' must be an object, got {_jtype(params)}")
    binary_default = (params or {}).get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise InputError(f"parameters.binary_data_output must be true or false, got {short_repr(binary_default)}")
    outputs, binary_outputs = requested_outputs(payload.get("outputs"), exposed, binary_default=binary_default)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"a list of {len(inputs)}" if isinstance(inputs, list) else _jtype(inputs)
        raise InputError(f"'inputs' must be a list of exactly one tensor named {INPUT_NAME!r}, got {got}")
    x = decode_input_tensor(inputs[0], input_shape=input_shape, max_batch=max_batch, binary=binary)
    return InferRequest(x=x, outputs=outputs, id=req_id, binary_outputs=binary_outputs)


def decode_input_tensor(
    tensor: Any, *, input_shape: Sequence[int], max_batch: int, binary: bytes | memoryview = b""
) -> np.ndarray:
    """Validate one ``$request_input`` and return its data as a C-contiguous float32 array.

    The elements come from ``data`` (JSON) or, when ``parameters.binary_data_size`` is given, from
    ``binary`` (all of it: there is one input), read with ``np.frombuffer`` as little-endian values of
    the declared datatype.
    """
    sample_shape = tuple(int(d) for d in input_shape)
    expected_shape = f"[n, {', '.join(str(d) for d in sample_shape)}] with 1 <= n <= {max_batch}"
    if not isinstance(tensor, dict):
        raise InputError(f"inputs[0] must be a tensor object, got {_jtype(tensor)}")
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise InputError(f"input name must be {INPUT_NAME!r}, got {short_repr(name)}")
    tparams = tensor.get("parameters")
    if tparams is not None and not isinstance(tparams, dict):
        raise InputError(f"inputs[0].parameters must be an object, got {_jtype(tparams)}")
    datatype = tensor.get("datatype")
    if datatype not in ACCEPTED_INPUT_DATATYPES:
        raise InputError(f"input datatype must be FP32 (FP64/FP16 are cast), got {short_repr(datatype)}")
    shape = tensor.get("shape")
    # `type(d) is int`, not isinstance: JSON true must not pass as a dimension of 1.
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InputError(f"input shape must be a list of integers {expected_shape}, got {short_repr(shape)}")
    if len(shape) != len(sample_shape) + 1 or tuple(shape[1:]) != sample_shape:
        raise InputError(f"input shape must be {expected_shape}, got {short_repr(shape)}")
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise InputError(f"batch size must be between 1 and {max_batch}, got {n} (shape {short_repr(shape)})")
    count = math.prod(shape)
    if tparams is not None and "binary_data_size" in tparams:
        arr = _binary_tensor(tensor, tparams["binary_data_size"], datatype, shape, count, binary)
    else:
        if len(binary):
            raise InputError(f"the body carries {len(binary)} bytes after the JSON header ({HEADER_LENGTH}) but "
                             f"inputs[0] declares no parameters.binary_data_size; declare it or send JSON 'data' only")
        arr = _json_tensor(tensor.get("data"), shape, count)
    if not np.isfinite(arr).all():
        raise InputError(f"input data must be finite numbers within float32 range (|x| <= {_FLOAT32_MAX:.4g}); "
                         f"got NaN, infinity or an out-of-range value")
    return arr.reshape(shape)


def _binary_tensor(tensor: dict, size: Any, datatype: str, shape: list[int], count: int,
                   binary: bytes | memoryview) -> np.ndarray:
    """The input's elements from the binary part of the body, checked against its declared size and shape."""
    if type(size) is not int or size < 0:
        raise InputError(f"inputs[0].parameters.binary_data_size must be a non-negative integer, "
                         f"got {short_repr(size)}")
    if "data" in tensor:
        raise InputError("inputs[0] has both 'data' and parameters.binary_data_size; send the elements one way only")
    dtype = DATATYPES[datatype].newbyteorder("<")
    needed = count * dtype.itemsize
    if size != needed:
        raise InputError(f"inputs[0].parameters.binary_data_size is {size} bytes but shape {short_repr(shape)} of "
                         f"{datatype} needs {needed} ({count} x {dtype.itemsize} bytes)")
    if len(binary) != size:
        raise InputError(f"inputs[0] declares binary_data_size {size} but the body has {len(binary)} bytes after the "
                         f"JSON header (whose length {HEADER_LENGTH} must give)")
    with np.errstate(over="ignore"):  # FP64 beyond float32's range becomes inf, refused by the finite check
        return np.frombuffer(binary, dtype=dtype, count=count).astype(np.float32)


def _json_tensor(data: Any, shape: list[int], count: int) -> np.ndarray:
    """The input's elements from JSON ``data``, flat or nested to ``shape``; every leaf a JSON number."""
    if not isinstance(data, list):
        raise InputError(f"input data must be a list of {count} numbers (flat or nested to {shape}), "
                         f"got {_jtype(data)}")
    flat = len(data) == count and not (data and type(data[0]) is list)  # flat, row-major
    leaves = data if flat else _nested_leaves(data, shape, count)
    bad = set(map(type, leaves)) - _NUMBER_TYPES  # `type`, not isinstance: True must not pass as 1.0
    if bad:
        raise InputError(f"input data must contain only JSON numbers, got {_describe_types(bad)}")
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            return np.array(leaves, dtype=np.float32)
        except OverflowError:  # an integer beyond float64 (only the stdlib json parser produces those)
            return np.array([np.inf], dtype=np.float32)


_NUMBER_TYPES = frozenset({int, float})


def _nested_leaves(data: list, shape: list[int], count: int) -> list:
    """The leaves of ``data`` nested to exactly ``shape``, or an InputError.

    An object array keeps the leaves as the parsed Python objects (never a numpy string array, whose
    size is count × longest string and could exhaust memory), so their types can still be checked.
    """
    expected = f"{count} numbers, flat or nested to {shape}"
    if len(data) != shape[0]:
        raise InputError(f"input data must be {expected}; got a list of {len(data)}")
    try:
        obj = np.array(data, dtype=object)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InputError(f"input data must be {expected} (ragged data: {first_line(exc)})") from None
    if list(obj.shape) != shape:
        raise InputError(f"input data must be {expected}; got data nested to {list(obj.shape)}")
    return obj.reshape(-1).tolist()


def _describe_types(types: set[type]) -> str:
    names = {
        bool: "booleans",
        str: "strings (NaN and infinity are not allowed, as strings or otherwise)",
        type(None): "nulls",
        list: "lists nested deeper than the shape or mixed with numbers",
        dict: "objects",
    }
    return ", ".join(sorted(names.get(t, t.__name__) for t in types))


def _jtype(value: Any) -> str:
    """The JSON type name of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded repr of client-supplied data, so error messages cannot be made arbitrarily large."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    return short_repr(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)
