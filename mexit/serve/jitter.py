"""TEST TOOL — a deployment with a real serving stack's overhead and heavy-tailed jitter. Never deploy it.

mexit's own server adds little time around the model, so timing attacks measured against it flatter the
attacker. Deployments we did not build (a Python front end, a model server with a scheduler, a proxy)
add several milliseconds per request, with a long right tail. :class:`JitteryRuntime` wraps any runtime
and, per ``predict`` call, waits ``overhead · exp(sigma · Z)`` (lognormal: median ``overhead_ms``,
heavy right tail) plus, with probability ``spike_p``, an exponential spike of mean ``spike_ms`` (a GC
pause, a scheduler hiccup) — all *outside* the model, so the exit-dependent compute time is unchanged
and only buried in noise. Serve it like any factory runtime::

    ServerProcess(factory="mexit.serve.jitter:jittery_bundle",
                  factory_kwargs={"bundle": "path/to/bundle", "overhead_ms": 3.0, "seed": 0})
    mexit serve --factory mexit.serve.jitter:jittery_toy --factory-kwargs '{"overhead_ms": 3}'

The delays are drawn from a seeded generator (reproducible sequences, not per input: unlike TimeGuard
this is noise, not a defense).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from mexit.errors import ConfigError
from mexit.runtime.types import Prediction, Runtime, WrappedShape


class JitterModel:
    """Per-request added delay in seconds: lognormal(median ``overhead_ms``, shape ``sigma``) + rare spikes."""

    def __init__(self, overhead_ms: float = 3.0, sigma: float = 0.1, spike_p: float = 0.01, spike_ms: float = 5.0,
                 seed: int = 0) -> None:
        if not overhead_ms > 0 or not math.isfinite(overhead_ms):
            raise ConfigError(f"overhead_ms must be a positive number of milliseconds, got {overhead_ms}")
        if not sigma >= 0 or not math.isfinite(sigma):
            raise ConfigError(f"sigma (the lognormal shape) must be >= 0, got {sigma}")
        if not 0 <= spike_p < 1 or not spike_ms >= 0:
            raise ConfigError(f"spike_p must lie in [0, 1) and spike_ms be >= 0, got {spike_p} and {spike_ms}")
        self.overhead_ms, self.sigma, self.spike_p, self.spike_ms = overhead_ms, sigma, spike_p, spike_ms
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def draw(self, size: int | None = None) -> Any:
        """Delays in seconds (a float, or an array of ``size``)."""
        with self._lock:
            n = 1 if size is None else size
            d = self.overhead_ms * np.exp(self.sigma * self._rng.standard_normal(n))
            spikes = self._rng.random(n) < self.spike_p
            d = d + np.where(spikes, self._rng.exponential(self.spike_ms, n), 0.0)
        d = d / 1e3
        return float(d[0]) if size is None else d

    def describe(self) -> dict[str, float]:
        return {"overhead_ms": self.overhead_ms, "sigma": self.sigma, "spike_p": self.spike_p,
                "spike_ms": self.spike_ms}


class JitteryRuntime(WrappedShape):
    """TEST TOOL: ``inner`` plus a :class:`JitterModel` delay per ``predict`` call (after the model ran).

    Everything else (``manifest``, ``bundle``, …) is the inner runtime's. ``latency_ns`` of the returned
    prediction includes the delay, as a client would measure it.
    """

    def __init__(self, inner: Runtime, jitter: JitterModel, sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner = self._wrapped = inner
        self.jitter = jitter
        self._sleep = sleep

    def predict(self, x: np.ndarray, *, full_depth: bool = False) -> Prediction:
        pred = self.inner.predict(x, full_depth=full_depth)
        delay = self.jitter.draw()
        self._sleep(delay)
        return replace(pred, latency_ns=np.asarray(pred.latency_ns, dtype=np.int64) + int(delay * 1e9))

    def __getattr__(self, name: str) -> Any:  # manifest, bundle, ... of the wrapped runtime
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def jittery_bundle(bundle: str, *, overhead_ms: float = 3.0, sigma: float = 0.1, spike_p: float = 0.01,
                   spike_ms: float = 5.0, seed: int = 0, threads: int = 1, backend: str | None = None,
                   backend_opts: dict[str, Any] | None = None) -> Any:
    """Factory for ``--factory``: the bundle served as ``mexit serve`` would, behind a :class:`JitteryRuntime`
    (``backend_opts``: the backend's own options, as ``mexit serve --backend-opt`` passes them)."""
    from mexit.serve.factory import ServedRuntime, build_served_runtime

    opts: dict[str, Any] = {"threads": threads, "backend_opts": backend_opts}
    if backend is not None:
        opts["backend"] = backend
    served = build_served_runtime(bundle, **opts)
    runtime = JitteryRuntime(served.runtime, JitterModel(overhead_ms, sigma, spike_p, spike_ms, seed))
    return ServedRuntime(runtime=runtime, model_name=served.model_name,  # type: ignore[arg-type]
                         metadata=served.metadata)


def jittery_toy(*, overhead_ms: float = 3.0, sigma: float = 0.1, spike_p: float = 0.01, spike_ms: float = 5.0,
                seed: int = 0, **toy_kwargs: Any) -> JitteryRuntime:
    """Factory for ``--factory``: :class:`~mexit.serve.testing.ToyRuntime` (``toy_kwargs``) behind the jitter."""
    from mexit.serve.testing import ToyRuntime

    return JitteryRuntime(ToyRuntime(**toy_kwargs), JitterModel(overhead_ms, sigma, spike_p, spike_ms, seed))
