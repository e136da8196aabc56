"""Fixtures for the serving tests: small deterministic numpy runtimes, in-process apps, a server subprocess.

The fake runtimes here implement the Runtime protocol without ONNX: :class:`ToyRuntime` (from
``mexit.serve.testing``, shared with the benchmarks and ``mexit serve --factory``) is a fixed
random linear model with 3 exits chosen by confidence. Tests use the 16-feature tabular form and a
small image-shaped one (to exercise nested data).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

with warnings.catch_warnings():  # starlette warns at import that TestClient will move to httpx2; irrelevant here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from mexit.runtime.types import Prediction
from mexit.serve import ServerProcess, create_app
from mexit.serve.testing import ToyRuntime

TOY_FACTORY = "mexit.serve.testing:ToyRuntime"
TOY_SEED = 7

def batch(n: int, shape: tuple[int, ...] = (16,), seed: int = 0) -> np.ndarray:
    """A reproducible float32 batch of standard-normal samples."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


class FailingRuntime(ToyRuntime):
    """Raises an unexpected error (with a secret-looking message) on every call."""

    def predict(self, x: np.ndarray, *, full_depth: bool = False, force_exit: int | None = None) -> Prediction:
        raise RuntimeError("kaboom: /secret/path/model.onnx line 42")


class WrongSizeRuntime(ToyRuntime):
    """Returns one prediction too few: a runtime bug the server must not pass on."""

    def predict(self, x: np.ndarray, *, full_depth: bool = False, force_exit: int | None = None) -> Prediction:
        pred = super().predict(x)
        return Prediction(pred.probs[1:], pred.labels[1:], pred.exit_index[1:], pred.latency_ns[1:])


class AsyncRuntime(ToyRuntime):
    """Has ``predict_async`` (like GuardedRuntime): the server must await it instead of using a thread."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.async_calls = 0
        self.sync_calls = 0

    def predict(self, x: np.ndarray, *, full_depth: bool = False, force_exit: int | None = None) -> Prediction:
        self.sync_calls += 1
        return super().predict(x, full_depth=full_depth, force_exit=force_exit)

    async def predict_async(self, x: np.ndarray) -> Prediction:
        self.async_calls += 1
        await asyncio.sleep(0)
        return super().predict(x)


@pytest.fixture
def toy() -> ToyRuntime:
    return ToyRuntime(seed=TOY_SEED)


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """``make_client(runtime=None, **create_app_options)`` -> a TestClient on a fresh app."""
    clients: list[TestClient] = []

    def make(runtime: Any = None, **opts: Any) -> TestClient:
        opts.setdefault("model_name", "toy")
        app = create_app(runtime if runtime is not None else ToyRuntime(seed=TOY_SEED), **opts)
        client = TestClient(app, raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(scope="session")
def toy_server() -> Iterator[ServerProcess]:
    """One real uvicorn server subprocess serving ToyRuntime(seed=TOY_SEED), shared by the session."""
    with ServerProcess(factory=TOY_FACTORY, factory_kwargs={"seed": TOY_SEED}, model_name="toy",
                       startup_timeout_s=60) as server:
        yield server


def infer_body(x: np.ndarray, *, nested: bool = False, **extra: Any) -> dict[str, Any]:
    """A spec-shaped inference request for the batch ``x``."""
    data = x.tolist() if nested else x.reshape(-1).tolist()
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], **extra}
