"""Clients for an early-exit model: over the Open Inference Protocol, or in-process.

:class:`OIPClient` talks to any OIP (KServe V2 / Triton HTTP) server, including ``mexit serve``;
:class:`LocalClient` wraps a runtime object directly. Both have the same interface and return the
same output names, so attacks collect signals from a local runtime and from a remote deployment
with the same code, and the difference between their ``rtt_ns`` is the serving overhead.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np

from mexit.errors import InputError, UserError
from mexit.runtime.types import Runtime
from mexit.serve import protocol
from mexit.serve.protocol import Expose

logger = logging.getLogger(__name__)


class ServerError(UserError):
    """The server answered with an error status; carries the status and the server's message."""

    def __init__(self, status: int, message: str, url: str) -> None:
        super().__init__(f"server at {url} answered {status}: {message}")
        self.status = status
        self.message = message
        self.url = url


class RequestRejectedError(ServerError, InputError):
    """The server refused the request as invalid (400, 413): the caller's input, like :class:`InputError`."""


class ServerUnreachableError(UserError):
    """No usable answer from the server after every retry (connection refused, timeout, reset)."""


@dataclass(frozen=True)
class InferResult:
    """Outputs by name (``probabilities``, ``label``, ``exit_index`` as exposed) and the round-trip time.

    ``rtt_ns`` is ``time.perf_counter_ns`` around the request and its response only (encoding and
    decoding excluded), for the final, successful attempt.
    """

    outputs: dict[str, np.ndarray]
    rtt_ns: int


class _HTTP:
    """A single keep-alive HTTP/1.1 connection (stdlib ``http.client``), reopened when it drops.

    Why not httpx: on the 2-core reference box httpx's pure-Python request path cost ~1 ms per
    request more than ``http.client`` (measured, interleaved, same server), and every microsecond of
    client overhead and jitter ends up in the response times that timing attacks and the serving
    overhead benchmark measure. Not thread-safe; :class:`OIPClient` serialises access with a lock.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"server URL must look like http://HOST:PORT, got {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self.requests_on_conn = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.timeout_s)
            self.requests_on_conn = 0
        return self._conn

    def request(self, method: str, path: str, body: bytes | None,
                header_length: int | None = None) -> tuple[int, str, bytes, int, str | None]:
        """``(status, reason, body, rtt_ns, inference_header_length)``; a stale kept-alive connection is
        retried once, silently.

        ``header_length`` (binary tensor data extension) is the byte length of the JSON header at the
        start of ``body``; the last element is the response's own ``Inference-Header-Content-Length``.
        Inference is idempotent, so resending after the server closed an idle connection is safe.
        """
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json" if header_length is None else "application/octet-stream"
            if header_length is not None:
                headers[protocol.HEADER_LENGTH] = str(header_length)
        for fresh_retry in (False, True):
            conn = self._connection()
            reused = self.requests_on_conn > 0
            try:
                start = time.perf_counter_ns()
                conn.request(method, self.prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                content = response.read()
                rtt_ns = time.perf_counter_ns() - start
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused and not fresh_retry:
                    continue
                raise
            except BaseException:
                self.close()
                raise
            self.requests_on_conn += 1
            if response.will_close:
                self.close()
            return response.status, response.reason, content, rtt_ns, response.getheader(protocol.HEADER_LENGTH)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class OIPClient:
    """A keep-alive HTTP client for one model on an Open Inference Protocol server.

    Retries (``retries`` extra attempts, exponential backoff from ``backoff_s``) cover transport
    failures (refused, reset, timed out) and 5xx answers only; a 4xx is the caller's problem and
    raises :class:`ServerError` (or :class:`RequestRejectedError`, also an :class:`InputError`, for
    400/413) at once. One connection, reused across calls; safe to share between threads (calls are
    serialised), but concurrent load wants one client per thread.

    ``binary`` chooses the binary tensor data extension (raw float32 input and outputs after a JSON
    header) over JSON ``data``: ``None`` (default) uses it when the server metadata lists
    ``binary_tensor_data``, asked once, at the first inference. It saves the JSON encoding and parsing
    of every element on both sides, which grows with the input size.
    """

    #: Set by :func:`mexit.serve.deploy.deployed` on teardown (see there).
    deployment_state: dict[str, Any] | None = None

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        model_version: str | None = None,
        binary: bool | None = None,
    ) -> None:
        if retries < 0 or backoff_s < 0 or not timeout_s > 0:
            raise UserError(f"need retries >= 0, backoff_s >= 0 and timeout_s > 0, got {retries}, {backoff_s}, "
                            f"{timeout_s}")
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = _HTTP(self.url, timeout_s)
        quoted = urllib.parse.quote(model_name, safe="")
        self._model_path = f"/v2/models/{quoted}" + (
            f"/versions/{urllib.parse.quote(model_version, safe='')}" if model_version else "")
        self._lock = threading.Lock()
        self.binary = binary

    # -- protocol calls -----------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The model metadata (``inputs``, ``outputs`` actually exposed, plus any extra deployment keys)."""
        return protocol.loads(self._request("GET", self._model_path)[0])

    def server_metadata(self) -> dict[str, Any]:
        """The server metadata (``name``, ``version``, ``extensions``)."""
        return protocol.loads(self._request("GET", "/v2")[0])

    def ready(self) -> bool:
        """Whether the model answers ready now (a probe: no retries, False when unreachable or not ready)."""
        try:
            with self._lock:
                status, _, content, _, _ = self._http.request("GET", self._model_path + "/ready", None)
        except (OSError, http.client.HTTPException):
            return False
        if status != 200:
            return False
        try:
            return bool(protocol.loads(content).get("ready", True))
        except (ValueError, AttributeError):
            return False

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> InferResult:
        """Classify the batch ``x`` (n, *input_shape); ``outputs`` restricts the returned names."""
        if np.asarray(x).dtype.kind != "f":  # before asking the server anything
            raise InputError(f"input must be a floating-point array (sent as FP32), got dtype {np.asarray(x).dtype}")
        if self.binary is None:
            self.binary = self._server_has_binary_extension()
        body, header_length = encode_infer_request(x, outputs, binary=self.binary)
        content, rtt_ns, response_header_length = self._request("POST", self._model_path + "/infer", body,
                                                                header_length)
        return InferResult(outputs=decode_infer_response(content, self.url, response_header_length), rtt_ns=rtt_ns)

    def _server_has_binary_extension(self) -> bool:
        """Whether the server metadata lists ``binary_tensor_data``; a server that answers ``GET /v2``
        with an error or with something else than an object is taken not to (it still gets JSON)."""
        try:
            meta = self.server_metadata()
        except (ServerError, ValueError):
            return False
        extensions = meta.get("extensions") if isinstance(meta, dict) else None
        return isinstance(extensions, list) and "binary_tensor_data" in extensions

    # -- transport ------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 header_length: int | None = None) -> tuple[bytes, int, str | None]:
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._lock:
                    status, reason, content, rtt_ns, response_header_length = self._http.request(
                        method, path, body, header_length)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, garbled
                last_problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                logger.debug("attempt %d on %s%s failed: %s", attempt + 1, self.url, path, last_problem)
                continue
            if status < 400:
                return content, rtt_ns, response_header_length
            message = _error_message(content, reason)
            if status >= 500:
                last_problem = f"HTTP {status}: {message}"
                if attempt < self.retries:
                    continue
            cls = RequestRejectedError if status in (400, 413) else ServerError
            raise cls(status, message, self.url + path)
        raise ServerUnreachableError(
            f"no answer from the mexit server at {self.url} after {self.retries + 1} attempt(s) ({last_problem}); "
            f"is it running (`mexit serve BUNDLE --port ...`) and is the URL right?"
        )

    def close(self) -> None:
        """Close the kept-alive connection."""
        with self._lock:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class LocalClient:
    """The :class:`OIPClient` interface over an in-process runtime (no HTTP, no JSON).

    Returns the same output names the server would for the same ``expose``/``expose_exit``, with the
    same dtypes, and measures ``rtt_ns`` around the runtime call alone.
    """

    #: Set by :func:`mexit.serve.deploy.deployed` on teardown (see there).
    deployment_state: dict[str, Any] | None = None

    def __init__(
        self,
        runtime: Runtime,
        *,
        model_name: str = "local",
        model_version: str = "1",
        expose: Expose = "probabilities",
        expose_exit: bool = False,
        metadata_extra: dict[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.model_name = model_name
        self.url = f"local://{model_name}"
        self.exposed = protocol.exposed_outputs(expose, expose_exit)
        self._metadata = protocol.model_metadata(
            model_name=model_name,
            model_version=model_version,
            input_shape=runtime.input_shape,
            num_classes=runtime.num_classes,
            outputs=self.exposed,
            extra=metadata_extra,
        )

    def metadata(self) -> dict[str, Any]:
        """The model metadata the server would publish for this runtime and exposure."""
        return dict(self._metadata)

    def server_metadata(self) -> dict[str, Any]:
        from mexit import __version__

        return {"name": protocol.SERVER_NAME, "version": __version__, "extensions": list(protocol.EXTENSIONS)}

    def ready(self) -> bool:
        return True

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> InferResult:
        """Classify the batch ``x`` in-process; raises :class:`InputError` where the server would answer 400."""
        names = protocol.select_outputs([{"name": o} for o in outputs] if outputs else None, self.exposed)
        arr = np.asarray(x)
        if arr.dtype.kind != "f":  # the server takes FP32/FP64/FP16 only; mirror it
            raise InputError(f"input must be a floating-point array (sent as FP32), got dtype {arr.dtype}")
        x = np.ascontiguousarray(arr, dtype=np.float32)
        start = time.perf_counter_ns()
        pred = self.runtime.predict(x)
        rtt_ns = time.perf_counter_ns() - start
        return InferResult(outputs=protocol.prediction_outputs(pred, names), rtt_ns=rtt_ns)

    def close(self) -> None:
        """Nothing to release; present for interface parity with :class:`OIPClient`."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def encode_infer_request(
    x: np.ndarray, outputs: list[str] | None = None, request_id: str | None = None, *, binary: bool = False
) -> tuple[bytes, int | None]:
    """``(body, header_length)`` of an inference request for the batch ``x`` (row-major FP32).

    JSON ``data`` when ``binary`` is false (``header_length`` is then ``None``); with ``binary``, the
    binary tensor data extension: a JSON header declaring ``binary_data_size``, then the raw
    little-endian float32 bytes, and every output asked for as binary data (``header_length`` is the
    JSON header's byte length, for the ``Inference-Header-Content-Length`` HTTP header).
    """
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise InputError(f"input must be a floating-point array (sent as FP32), got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype="<f4")
    payload: dict[str, Any] = {}
    if request_id is not None:
        payload["id"] = request_id
    tensor: dict[str, Any] = {"name": protocol.INPUT_NAME, "shape": list(arr.shape), "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": arr.nbytes}
    else:
        tensor["data"] = protocol.flat_data(arr)
    payload["inputs"] = [tensor]
    if outputs:
        payload["outputs"] = [{"name": name, "parameters": {"binary_data": True}} if binary else {"name": name}
                              for name in outputs]
    elif binary:
        payload["parameters"] = {"binary_data_output": True}
    header = protocol.dumps(payload)
    if not binary:
        return header, None
    return header + arr.tobytes(), len(header)


def decode_infer_response(content: bytes, url: str = "", header_length: str | int | None = None
                          ) -> dict[str, np.ndarray]:
    """Output arrays by name from an ``$inference_response`` body, JSON or binary tensor data.

    ``header_length`` is the response's ``Inference-Header-Content-Length`` (``None``: all JSON).
    """
    try:
        view = memoryview(content)
        split = len(content) if header_length is None else int(header_length)
        if not 0 <= split <= len(content):
            raise ValueError(f"{protocol.HEADER_LENGTH} {split} is beyond the body's {len(content)} bytes")
        payload = protocol.loads(bytes(view[:split]))
        offset = split
        arrays: dict[str, np.ndarray] = {}
        for out in payload["outputs"]:
            dtype = protocol.DATATYPES[out["datatype"]]
            size = (out.get("parameters") or {}).get("binary_data_size")
            if size is None:
                arrays[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
                continue
            if offset + int(size) > len(content):
                raise ValueError(f"output {out['name']!r} declares {size} bytes beyond the end of the body")
            raw = np.frombuffer(view[offset:offset + int(size)], dtype=dtype.newbyteorder("<"))
            arrays[out["name"]] = raw.astype(dtype).reshape(out["shape"])
            offset += int(size)
        return arrays
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"the server at {url or '?'} sent a malformed inference response "
                        f"({type(exc).__name__}: {exc}); is it an Open Inference Protocol server?") from None


def _error_message(content: bytes, reason: str) -> str:
    try:
        payload = protocol.loads(content)
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return payload["error"]
    except ValueError:
        pass
    text = content.decode("utf-8", "replace").strip()
    return text[:200] if text else reason
