"""The Open Inference Protocol (KServe V2 / Triton HTTP) server as a Starlette application.

Endpoints (JSON, and for inference also the binary tensor data extension; errors are ``{"error": "..."}``
with a 4xx/5xx status):

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

Where ``predict`` runs: a runtime with ``predict_async`` (TimeGuard's :class:`mexit.defense.GuardedRuntime`)
is awaited, so its delay is an ``asyncio.sleep``. Otherwise a batch whose predicted cost is at most
``inline_below_ms`` (default 2 ms) runs directly on the event loop, and a larger one in a worker
thread. The thread hand-off costs 0.2-0.7 ms on the 2-core reference box, more than a small model's
whole batch-1 latency; running inline blocks the loop, so the bound is how long one request can
hold up the others (``tests/serve/test_app.py`` checks that a large batch does not). The cost is
measured at start-up (batch 1 and batch 8, every sample to the last exit; see
:func:`measure_predict_cost`).

The server must never die on bad input: every request is validated (see :mod:`mexit.serve.protocol`),
bodies are bounded while they stream in, and an unexpected runtime failure becomes a 500 with a
generic message while the traceback goes to the log only.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mexit import __version__
from mexit.errors import ConfigError, InputError
from mexit.runtime.types import Prediction, Runtime
from mexit.serve import protocol
from mexit.serve.protocol import Expose

logger = logging.getLogger(__name__)

_JSON = "application/json"
_BINARY = "application/octet-stream"
PredictMode = Literal["auto", "inline", "thread"]
PREDICT_MODES: tuple[str, ...] = ("auto", "inline", "thread")
#: Default bound on the predicted time of a prediction run on the event loop (see create_app).
DEFAULT_INLINE_BELOW_MS = 2.0
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
    predict: PredictMode = "auto",
    inline_below_ms: float = DEFAULT_INLINE_BELOW_MS,
    predict_inline: bool = False,
) -> Starlette:
    """Build the ASGI application serving ``runtime`` as model ``model_name``.

    ``runtime`` implements :class:`mexit.runtime.types.Runtime`; if it also has an ``async
    predict_async(x)`` (as :class:`mexit.defense.GuardedRuntime` does, so that TimeGuard's wait does
    not hold a thread), that is awaited. Otherwise ``predict`` chooses where ``runtime.predict`` runs:
    ``"auto"`` (default) measures the runtime now and runs batches predicted to take at most
    ``inline_below_ms`` on the event loop, larger ones in Starlette's thread pool; ``"inline"`` runs
    every batch on the loop (it saves the thread hand-off but blocks every other request, health
    probes included, for as long as a prediction takes); ``"thread"`` always uses the thread pool.
    ``predict_inline=True`` is the older spelling of ``predict="inline"``.
    ``app.state.predict_plan`` records the choice and the measured costs.
    """
    if not model_name or "/" in model_name:
        raise ConfigError(f"model name must be a non-empty string without '/', got {model_name!r}")
    if not model_version or "/" in model_version:
        raise ConfigError(f"model version must be a non-empty string without '/', got {model_version!r}")
    if max_body_bytes < 1 or max_batch < 1:
        raise ConfigError(f"max_body_bytes and max_batch must be >= 1, got {max_body_bytes} and {max_batch}")
    if not inline_below_ms >= 0:
        raise ConfigError(f"inline_below_ms must be >= 0, got {inline_below_ms}")
    if predict_inline:
        predict = "inline"
    if predict not in PREDICT_MODES:
        raise ConfigError(f"predict must be one of {list(PREDICT_MODES)}, got {predict!r}")
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
    server_meta = {"name": protocol.SERVER_NAME, "version": __version__, "extensions": list(protocol.EXTENSIONS)}
    plan = plan_prediction(runtime, mode=predict, inline_below_ms=inline_below_ms, max_batch=max_batch)
    run_predict = _predictor(runtime, plan)

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

    async def answer_infer(headers: dict[bytes, bytes], receive: Receive, arrival_ns: int) -> _Answer:
        """Read, validate and run one inference request: ``(status, body, content type, extra headers)``."""
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() != b"identity":
            return _error(415, f"Content-Encoding {protocol.short_repr(encoding.decode('latin-1'))} is not "
                               f"supported; send the body uncompressed")
        try:
            body = await _receive_body(receive, headers.get(b"content-length"), max_body_bytes)
        except _BodyTooLarge as exc:
            return _error(413, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        except ClientDisconnect:
            return _error(400, "the client disconnected before sending the whole body")
        header_length = headers.get(b"inference-header-content-length")
        try:
            header, binary = protocol.split_binary_body(
                body, None if header_length is None else header_length.decode("latin-1"))
        except InputError as exc:
            return _error(400, str(exc))
        try:
            payload = protocol.loads(header)
        except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError and json's are ValueErrors
            return _error(400, f"the request body is not valid JSON: {protocol.first_line(exc)}")
        try:
            req = protocol.decode_infer_request(
                payload, input_shape=input_shape, exposed=exposed, max_batch=max_batch, binary=binary
            )
        except InputError as exc:
            return _error(400, str(exc))
        n = req.x.shape[0]
        try:
            pred = await run_predict(req.x, arrival_ns)
        except InputError as exc:  # the runtime's own validation: still the client's input
            return _error(400, str(exc))
        except Exception:
            logger.exception("inference failed for a batch of shape %s", req.x.shape)
            return _error(500, _INTERNAL_ERROR)
        if len(pred) != n or pred.probs.shape != (n, num_classes):
            logger.error("runtime returned %d results (probs %s) for a batch of %d", len(pred), pred.probs.shape, n)
            return _error(500, _INTERNAL_ERROR)
        outputs = protocol.prediction_outputs(pred, req.outputs)
        response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
        if req.id is not None:
            response["id"] = req.id
        content, json_length = protocol.encode_infer_response(response, outputs, req.binary_outputs)
        if json_length is None:
            return 200, content, _JSON_BYTES, ()
        return 200, content, _BINARY_BYTES, ((_HEADER_LENGTH_BYTES, str(json_length).encode()),)

    async def infer_fast(scope: Scope, receive: Receive, send: Send) -> None:
        """The inference endpoint as a bare ASGI callable: no routing, Request or Response objects."""
        arrival_ns = time.perf_counter_ns()
        try:
            answer = await answer_infer(dict(scope["headers"]), receive, arrival_ns)
        except Exception:  # a bug, not the client's input: the same generic 500 as everywhere else
            logger.exception("unhandled error on POST %s", scope.get("path", "")[:200])
            answer = _error(500, _INTERNAL_ERROR)
        await _send_answer(send, answer)

    async def infer(request: Request) -> Response:
        """The routed inference endpoint: reached only by paths the fast path does not take (a wrong
        model or version, which ``check_model`` answers 404)."""
        arrival_ns = time.perf_counter_ns()
        check_model(request)
        status, content, content_type, extra = await answer_infer(dict(request.scope["headers"]), request.receive,
                                                                  arrival_ns)
        return Response(content, status_code=status, media_type=content_type.decode(),
                        headers={k.decode(): v.decode() for k, v in extra})

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
    fast_paths = {f"/v2/models/{model_name}/infer", f"/v2/models/{model_name}/versions/{model_version}/infer"}
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_InferFastPath, paths=fast_paths, handler=infer_fast)],
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected_exception},
    )
    app.state.model_name = model_name
    app.state.exposed = exposed
    app.state.predict_plan = plan
    return app


@dataclass(frozen=True)
class PredictPlan:
    """Where the server runs ``predict``, and the start-up measurement behind the choice.

    ``mode`` is ``"async"`` (the runtime's own ``predict_async``), ``"inline"`` (every batch on the
    event loop), ``"thread"`` (every batch in the thread pool) or ``"auto"`` (batches of at most
    ``max_inline_batch`` samples on the loop, larger ones in the pool).
    """

    mode: str
    max_inline_batch: int
    inline_below_ms: float | None = None
    batch1_ms: float | None = None
    per_sample_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for people (after "predictions "): where they run and, for ``auto``, the measured cost that
        decided it."""
        if self.mode == "async":
            return "are awaited through the runtime's predict_async (a timing defense: compute in worker threads, "\
                   "the wait on the event loop)"
        if self.mode == "inline":
            return "run on the event loop"
        if self.mode == "thread":
            return "run in worker threads"
        cost = f"worst case at batch 1 {self.batch1_ms:.2f} ms, bound {self.inline_below_ms:g} ms"
        if self.max_inline_batch == 0:
            return f"run in worker threads ({cost}; --predict inline keeps them on the event loop)"
        return f"run on the event loop up to batch {self.max_inline_batch}, larger in worker threads ({cost})"


def measure_predict_cost(runtime: Runtime, *, budget_s: float = 0.5, repeats: int = 15,
                         give_up_s: float = 0.05) -> tuple[float, float] | None:
    """``(batch-1 seconds, extra seconds per additional sample)`` of ``runtime.predict`` in its worst case.

    The worst case of an early-exit model is every sample leaving at the last exit: that is what would
    hold the event loop longest. It is asked for with ``force_exit=num_exits - 1`` when ``predict``
    takes it (the chained runtime: the normal path, every exit evaluated), else ``full_depth=True``.
    Batch 1 is the minimum of up to ``repeats`` timed calls after two warm-ups, within ``budget_s``:
    the model's own cost. On a busy machine many calls also include other processes' time slices (on
    the 2-core reference box at load 10, a quarter of the calls took 10-13 ms instead of 1.5 ms); that
    delay is not the model's, it strikes a thread hand-off just as hard, and counting it would make
    the choice depend on the moment of start-up. The per-sample slope comes from batch 8 the same way.
    Each batch size is timed in its own block, as a server answering requests of one size runs it: a
    batch-1 call right after a batch-8 one runs on caches the other path filled (the chained runtime's
    single batch-1 graph holds its own copy of every weight) and took 2.3-2.6 ms instead of 1.4 ms for
    the Location FCN-18-1 ×6, enough to flip the plan.
    ``None`` if the runtime fails on a seeded random input (the server then uses the thread pool, and
    real requests will surface the failure); one call slower than ``give_up_s`` ends the measurement.
    """
    rng = np.random.default_rng(0)
    shape = tuple(int(d) for d in runtime.input_shape)
    x1 = rng.standard_normal((1, *shape)).astype(np.float32)
    x8 = rng.standard_normal((8, *shape)).astype(np.float32)
    try:
        params = inspect.signature(runtime.predict).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented predict: no introspection
        params = {}
    worst: dict[str, Any] = ({"force_exit": int(runtime.num_exits) - 1} if "force_exit" in params
                             else {"full_depth": True} if "full_depth" in params else {})

    def call(x: np.ndarray) -> float:
        start = time.perf_counter()
        runtime.predict(x, **worst)
        return time.perf_counter() - start

    try:
        first = call(x1)
        if first > give_up_s:
            return first, first
        ones: list[float] = []
        eights: list[float] = []
        for x, times in ((x1, ones), (x8, eights)):
            call(x)  # a warm-up in each block
            deadline = time.perf_counter() + budget_s / 2
            while len(times) < repeats and time.perf_counter() < deadline:
                times.append(call(x))
    except Exception as exc:
        logger.warning("could not time the runtime at start-up (%s: %s); predictions run in worker threads",
                       type(exc).__name__, exc)
        return None
    batch1 = min(ones)
    per_sample = max(0.0, (min(eights) - batch1) / 7)
    return batch1, per_sample


def plan_prediction(runtime: Runtime, *, mode: PredictMode, inline_below_ms: float, max_batch: int) -> PredictPlan:
    """Choose where ``predict`` runs (see :class:`PredictPlan` and :func:`create_app`)."""
    predict_async = getattr(runtime, "predict_async", None)
    if predict_async is not None and inspect.iscoroutinefunction(predict_async):
        return PredictPlan("async", 0)
    if mode == "inline":
        return PredictPlan("inline", max_batch)
    if mode == "thread":
        return PredictPlan("thread", 0)
    bound_s = inline_below_ms / 1e3
    cost = measure_predict_cost(runtime, give_up_s=max(0.05, 10 * bound_s))
    if cost is None:
        return PredictPlan("thread", 0, inline_below_ms)
    batch1_s, per_sample_s = cost
    if batch1_s > bound_s:
        largest = 0
    elif per_sample_s <= 0:
        largest = max_batch
    else:
        largest = min(max_batch, 1 + math.floor((bound_s - batch1_s) / per_sample_s))
    plan = PredictPlan("auto", largest, inline_below_ms, round(batch1_s * 1e3, 4), round(per_sample_s * 1e3, 5))
    logger.info("predict plan: batches of <= %d on the event loop, larger in worker threads (batch 1 %.3f ms, "
                "+%.4f ms/sample, bound %.2f ms)", largest, batch1_s * 1e3, per_sample_s * 1e3, inline_below_ms)
    return plan


def _predictor(runtime: Runtime, plan: PredictPlan) -> Callable[[Any, int], Awaitable[Prediction]]:
    """An ``async (x, arrival_ns) -> Prediction`` for ``runtime`` following ``plan``.

    Its own ``predict_async`` when it has one (given the request's arrival time if it takes
    ``arrival_ns``, so that a delay policy counts from when the request arrived, parsing included);
    else ``predict`` on the event loop for batches up to ``plan.max_inline_batch``, in a worker thread
    for larger ones.
    """
    if plan.mode == "async":
        predict_async = runtime.predict_async  # type: ignore[attr-defined]
        if "arrival_ns" in inspect.signature(predict_async).parameters:

            async def guarded(x: Any, arrival_ns: int) -> Prediction:
                return await predict_async(x, arrival_ns=arrival_ns)

            return guarded

        async def own_async(x: Any, arrival_ns: int) -> Prediction:
            return await predict_async(x)

        return own_async
    largest = plan.max_inline_batch
    predict = runtime.predict

    async def on_loop_or_thread(x: Any, arrival_ns: int) -> Prediction:
        if x.shape[0] <= largest:
            return predict(x)
        return await run_in_threadpool(predict, x)

    return on_loop_or_thread


class _InferFastPath:
    """Sends ``POST`` to the exact inference paths of the served model straight to ``handler``.

    Starlette's routing (a regular expression per route), ``Request``/``Response`` objects and
    exception middleware cost tens of microseconds per request, a sizeable part of a sub-millisecond
    budget; everything else (metadata, health, errors for unknown paths) still goes through them.
    """

    def __init__(self, app: ASGIApp, *, paths: set[str], handler: ASGIApp) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if path in self.paths:
                await self.handler(scope, receive, send)
                return
        await self.app(scope, receive, send)


_Answer = tuple[int, bytes, bytes, tuple[tuple[bytes, bytes], ...]]
_JSON_BYTES = _JSON.encode()
_BINARY_BYTES = _BINARY.encode()
_HEADER_LENGTH_BYTES = protocol.HEADER_LENGTH.lower().encode()


def _error(status: int, message: str) -> _Answer:
    return status, protocol.dumps({"error": message}), _JSON_BYTES, ()


async def _send_answer(send: Send, answer: _Answer) -> None:
    status, content, content_type, extra = answer
    headers = [(b"content-length", str(len(content)).encode()), (b"content-type", content_type), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def _receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The request body, refusing (413) one whose declared *or* streamed size exceeds ``limit`` bytes.

    The declared Content-Length is checked first so that an honest oversized request is refused
    without reading it; the running total catches chunked bodies and lying headers.
    """
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(f"invalid Content-Length header {protocol.short_repr(declared)}") from None
        if size > limit:
            raise _BodyTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes "
                                f"(the server's --max-body-mb)")
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise _BodyTooLarge(f"request body exceeds the limit of {limit} bytes (the server's --max-body-mb)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
