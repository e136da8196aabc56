"""Open Inference Protocol (KServe V2 / Triton HTTP) server and clients for early-exit runtimes.

* :func:`create_app` — the Starlette application; :func:`serve` — run it with uvicorn;
  :class:`ServerProcess` — run ``mexit serve`` (``python -m mexit.cli serve``) as a child process (tests,
  benchmarks, audits).
* :class:`OIPClient` (HTTP) and :class:`LocalClient` (in-process) — one interface for querying a
  deployment, returning :class:`InferResult` (outputs by name and the round-trip time).
* :func:`build_served_runtime` — load a bundle (and a registered defense) the way ``mexit serve`` does.
* :func:`connect` / :func:`deployed` — a bundle or a URL → a client (and the owner's runtime), as
  ``mexit attack`` and the audit reach deployments.

Names are imported lazily so that ``import mexit.serve.client`` does not pull in the ASGI stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "mexit.serve.app",
    "serve": "mexit.serve.server",
    "bind_socket": "mexit.serve.server",
    "ServerProcess": "mexit.serve.server",
    "OIPClient": "mexit.serve.client",
    "LocalClient": "mexit.serve.client",
    "InferResult": "mexit.serve.client",
    "ServerError": "mexit.serve.client",
    "RequestRejectedError": "mexit.serve.client",
    "ServerUnreachableError": "mexit.serve.client",
    "build_served_runtime": "mexit.serve.factory",
    "runtime_from_factory": "mexit.serve.factory",
    "ServedRuntime": "mexit.serve.factory",
    "ToyRuntime": "mexit.serve.testing",
    "connect": "mexit.serve.deploy",
    "deployed": "mexit.serve.deploy",
    "Deployment": "mexit.serve.deploy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mexit.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
