"""The Open Inference Protocol (KServe V2 / Triton HTTP) server as a Starlette application.

Endpoints (all JSON; errors are ``{"error": "..."}`` with a 4xx/5xx status):

=======  =====================================================  ==========================================
GET      ``/v2/health/live``, ``/v2/health/ready``               ``{"live": true}`` / ``{"ready": true}``
GET      ``/v2``                                                 server metadata (name, version, extensions)
GET      ``/v2/models/{name}[/versions/{v}]``                    model metadata (inputs, exposed outputs)
GET      ``/v2/models/{name}[/versions/{v}]/ready``              ``{"name": ..., "ready": true}``
POST     ``/v2/models/{name}[/versions/{v}]/infer``              inference
=======  =====================================================  ==========================================

What the deployment reveals is a privacy decision (Li et al. CCS'22): ``expose`` chooses between full
probability vectors and labels only, and the exit a sample took is returned only with
``expose_exit=True`` (the paper's Adversary 1). Nothing else about the exit leaks through the
protocol: no timing or exit headers, the same response shape for every exit. (Response *time* still
depends on the exit; that is what TimeGuard, applied inside the runtime, is for.)

The server must never die on bad input: every request is validated (see :mod:`mexit.serve.protocol`),
bodies are bounded while they stream in, and an unexpected runtime failure becomes a 500 with a
generic message while the traceback goes to the log only.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from mexit import __version__
from mexit.errors import ConfigError, InputError
from mexit.runtime.types import Prediction, Runtime
from mexit.serve import protocol
from mexit.serve.protocol import Expose

logger = logging.getLogger(__name__)

_JSON = "application/json"
_INTERNAL_ERROR = "internal error while running the model; the server log has the details"


class _BodyTooLarge(Exception):
    pass


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with :func:`protocol.dumps` (orjson when available)."""
    return Response(protocol.dumps(obj), status_code=status, media_type=_JSON, headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The protocol's error object, ``{"error": message}``."""
    return json_response({"error": message}, status=status, headers=headers)


def create_app(
    runtime: Runtime,
    *,
    model_name: str,
    model_version: str = "1",
    expose: Expose = "probabilities",
    expose_exit: bool = False,
    max_body_bytes: int = 4 * 2**20,
    max_batch: int = 1024,
    metadata_extra: dict[str, Any] | None = None,
    predict_inline: bool = False,
) -> Starlette:
    """Build the ASGI application serving ``runtime`` as model ``model_name``.

    ``runtime`` implements :class:`mexit.runtime.types.Runtime`; if it also has an ``async
    predict_async(x)`` (as :class:`mexit.defense.GuardedRuntime` does, so that TimeGuard's wait does
    not hold a thread), that is awaited; otherwise ``predict`` runs in Starlette's thread pool so the
    event loop keeps serving other requests. ``predict_inline=True`` calls ``predict`` on the event
    loop instead: it saves the thread hand-off (0.4-0.7 ms per request on the busy 2-core reference box,
    see ``benchmarks/serve_overhead.py --inline``), which matters for sub-millisecond models, but it
    blocks every other request, health probes included, while a prediction runs.
    """
    if not model_name or "/" in model_name:
        raise ConfigError(f"model name must be a non-empty string without '/', got {model_name!r}")
    if not model_version or "/" in model_version:
        raise ConfigError(f"model version must be a non-empty string without '/', got {model_version!r}")
    if max_body_bytes < 1 or max_batch < 1:
        raise ConfigError(f"max_body_bytes and max_batch must be >= 1, got {max_body_bytes} and {max_batch}")
    exposed = protocol.exposed_outputs(expose, expose_exit)
    input_shape = tuple(int(d) for d in runtime.input_shape)
    num_classes = int(runtime.num_classes)
    model_meta = protocol.model_metadata(
        model_name=model_name,
        model_version=model_version,
        input_shape=input_shape,
        num_classes=num_classes,
        outputs=exposed,
        extra=metadata_extra,
    )
    server_meta = {"name": protocol.SERVER_NAME, "version": __version__, "extensions": []}
    predict = _predictor(runtime, inline=predict_inline)

    def check_model(request: Request) -> None:
        name = request.path_params["model_name"]
        version = request.path_params.get("version")
        if name != model_name:
            raise HTTPException(404, f"unknown model {protocol.short_repr(name)}; this server serves {model_name!r}")
        if version is not None and version != model_version:
            raise HTTPException(404, f"unknown version {protocol.short_repr(version)} of model {model_name!r}; "
                                     f"available: [{model_version!r}]")

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        return json_response({"ready": True})

    async def server_metadata(request: Request) -> Response:
        return json_response(server_meta)

    async def model_metadata(request: Request) -> Response:
        check_model(request)
        return json_response(model_meta)

    async def model_ready(request: Request) -> Response:
        check_model(request)
        return json_response({"name": model_name, "ready": True})

    async def infer(request: Request) -> Response:
        arrival_ns = time.perf_counter_ns()
        check_model(request)
        if "inference-header-content-length" in request.headers:
            return error_response(400, protocol.BINARY_UNSUPPORTED)
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge as exc:
            return error_response(413, str(exc))
        except ClientDisconnect:
            return error_response(400, "the client disconnected before sending the whole body")
        try:
            payload = protocol.loads(body)
        except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError and json's are ValueErrors
            return error_response(400, f"the request body is not valid JSON: {protocol.first_line(exc)}")
        try:
            req = protocol.decode_infer_request(
                payload, input_shape=input_shape, exposed=exposed, max_batch=max_batch
            )
        except InputError as exc:
            return error_response(400, str(exc))
        n = req.x.shape[0]
        try:
            pred = await predict(req.x, arrival_ns)
        except InputError as exc:  # the runtime's own validation: still the client's input
            return error_response(400, str(exc))
        except Exception:
            logger.exception("inference failed for a batch of shape %s", req.x.shape)
            return error_response(500, _INTERNAL_ERROR)
        if len(pred) != n or pred.probs.shape != (n, num_classes):
            logger.error("runtime returned %d results (probs %s) for a batch of %d", len(pred), pred.probs.shape, n)
            return error_response(500, _INTERNAL_ERROR)
        outputs = protocol.prediction_outputs(pred, req.outputs)
        response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
        if req.id is not None:
            response["id"] = req.id
        response["outputs"] = protocol.response_outputs(outputs)
        return json_response(response)

    model_routes: list[Route] = []
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        model_routes += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        *model_routes,
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected_exception},
    )
    app.state.model_name = model_name
    app.state.exposed = exposed
    return app


def _predictor(runtime: Runtime, *, inline: bool = False) -> Callable[[Any, int], Awaitable[Prediction]]:
    """An ``async (x, arrival_ns) -> Prediction`` for ``runtime``.

    Its own ``predict_async`` when it has one (given the request's arrival time if it takes
    ``arrival_ns``, so that a delay policy counts from when the request arrived, parsing included);
    else ``predict`` in a worker thread, or on the event loop when ``inline``.
    """
    predict_async = getattr(runtime, "predict_async", None)
    if predict_async is not None and inspect.iscoroutinefunction(predict_async):
        if "arrival_ns" in inspect.signature(predict_async).parameters:

            async def guarded(x: Any, arrival_ns: int) -> Prediction:
                return await predict_async(x, arrival_ns=arrival_ns)

            return guarded

        async def own_async(x: Any, arrival_ns: int) -> Prediction:
            return await predict_async(x)

        return own_async
    if inline:

        async def on_loop(x: Any, arrival_ns: int) -> Prediction:
            return runtime.predict(x)

        return on_loop

    async def in_thread(x: Any, arrival_ns: int) -> Prediction:
        return await run_in_threadpool(runtime.predict, x)

    return in_thread


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one whose declared *or* streamed size exceeds ``limit`` bytes.

    The declared Content-Length is checked first so that an honest oversized request is refused
    without reading it; the running total catches chunked bodies and lying headers.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length header {protocol.short_repr(declared)}") from None
        if size > limit:
            raise _BodyTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes "
                                f"(the server's --max-body-mb)")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _BodyTooLarge(f"request body exceeds the limit of {limit} bytes (the server's --max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors (404 unknown path or model, 405 wrong method) as protocol error objects."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404 and exc.detail == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path[:200]}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path[:200]}"
        allow = (exc.headers or {}).get("Allow")
        if allow:
            message += f"; use {allow}"
    else:
        message = str(exc.detail)
    return error_response(status, message, headers=exc.headers)


async def _unexpected_exception(request: Request, exc: Exception) -> Response:
    """Last resort: a bug anywhere in request handling answers 500 without leaking the traceback."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, _INTERNAL_ERROR)
