"""Reach a deployment the way an attacker meets it: a bundle or a URL in, a client (and the owner's runtime) out.

Used by ``mexit attack`` and the audit alike, so both query deployments through the same wiring.

* :func:`connect` — ``"http://…"`` → an :class:`OIPClient`; a bundle directory → a :class:`LocalClient` over
  an in-process runtime, plus that runtime as the *owner's* view (its ground-truth exits score stealing).
* :func:`deployed` — deploy a bundle for the length of a ``with`` block: ``mode="server"`` starts a real
  ``mexit serve`` child on loopback (:class:`ServerProcess`), ``mode="in-process"`` loads it here (no HTTP:
  faster, but without the serving stack's latency). Both apply a defense exactly as ``mexit serve`` does.
  The child is always stopped: normally, on an error, or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexit._io import jsonable
from mexit.errors import ConfigError
from mexit.serve.client import LocalClient, OIPClient
from mexit.serve.server import DEFAULT_HOST, ServerProcess, bind_socket

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    """A client to query, and — when the deployment is a local bundle — the owner's runtime on it."""

    client: Any
    owner: Any = None
    where: str = ""


def is_url(where: str | Path) -> bool:
    return str(where).startswith(("http://", "https://"))


def owner_runtime(bundle: str | Path, *, threads: int = 1, backend: str = "onnxruntime",
                  backend_opts: Mapping[str, Any] | None = None) -> Any:
    """An in-process runtime on ``bundle`` for the owner's ground truth (exits, losses).

    ``backend_opts``: the backend's own options; give the deployment's, so that the true exits are the ones
    the deployment takes (e.g. with ``int8_heads`` a few samples leave at another exit than in float32).
    """
    from mexit.runtime import EarlyExitRuntime

    return EarlyExitRuntime(bundle, backend=backend, threads=threads, **dict(backend_opts or {}))


def connect(where: str | Path, *, model_name: str | None = None, bundle: str | Path | None = None,
            expose: str = "probabilities", expose_exit: bool = False, threads: int = 1,
            backend: str = "onnxruntime", warmup: int = 5) -> Deployment:
    """A deployment to attack: an OIP server URL (``model_name`` needed) or a bundle directory (in-process).

    ``bundle``: for a URL, the served bundle if the caller owns it (the attacker's own shadow, or an
    auditor scoring stealing against the true exits); None leaves the owner's view empty.
    """
    where_s = str(where)
    if is_url(where_s):
        if not model_name:
            raise ConfigError(f"pass the name of the model served at {where_s} (e.g. --target-model NAME)")
        owner = owner_runtime(bundle, threads=threads, backend=backend) if bundle is not None else None
        return Deployment(OIPClient(where_s, model_name), owner, where_s)
    runtime = owner_runtime(where_s, threads=threads, backend=backend)
    if warmup:
        runtime.warmup(warmup)
    return Deployment(LocalClient(runtime, expose=expose, expose_exit=expose_exit), runtime, where_s)


class NamedClient:
    """A client presented under a stable name (``mexit-audit://<name>``).

    Collection checkpoints record the URL of their target; a server restarted after an interruption gets
    another free port, yet it serves the same bundle, so the resumed collection must see the same name.
    """

    def __init__(self, client: Any, name: str) -> None:
        self._client = client
        self.url = f"mexit-audit://{name}"
        self.model_name = getattr(client, "model_name", name)
        self.endpoint = getattr(client, "url", "")

    def infer(self, x: Any, outputs: list[str] | None = None) -> Any:
        return self._client.infer(x, outputs)

    def ready(self) -> bool:
        return bool(self._client.ready())

    def close(self) -> None:
        self._client.close()


def check_port_free(port: int, host: str = DEFAULT_HOST) -> None:
    """Raise a one-line :class:`UserError` now when a fixed ``port`` is taken (0 = any free port)."""
    if port:
        bind_socket(host, port).close()


def runtime_state(runtime: Any) -> dict[str, Any] | None:
    """What a served runtime reports about itself, as JSON-able data: a timing defense's ``describe()`` (its
    schedule, calibration, refits and overruns; no key material), or None for a runtime without one."""
    describe = getattr(runtime, "describe", None)
    state = describe() if callable(describe) else None
    if not isinstance(state, dict):
        return None
    return jsonable(state)


@contextlib.contextmanager
def deployed(
    bundle: str | Path,
    *,
    mode: str,
    expose: str = "probabilities",
    expose_exit: bool = False,
    threads: int = 1,
    port: int = 0,
    backend: str = "onnxruntime",
    backend_opts: Mapping[str, Any] | None = None,
    defense: str | None = None,
    defense_params: Mapping[str, Any] | None = None,
    key_file: str | Path | None = None,
    adapt: bool = True,
) -> Iterator[Any]:
    """A client of ``bundle`` deployed in ``mode`` ("server" or "in-process"); always torn down on exit.

    ``backend_opts``: the backend's own options (``mexit serve --backend-opt KEY=VALUE`` for a server).
    ``defense``: a registered defense name (:func:`mexit.defense.defense_names`) with its ``defense_params``;
    ``adapt``: whether a fitted defense refits on live times (:class:`~mexit.defense.guarded.GuardedRuntime`).

    After the block, ``client.deployment_state`` holds what the deployed runtime reported when it was torn down
    (:func:`runtime_state`: a timing defense's schedule, refits and overruns), or None.
    """
    if mode == "server":
        check_port_free(port)
        server = ServerProcess(bundle, port=port, expose=expose, expose_exit=expose_exit, threads=threads,
                               backend=backend, backend_opts=backend_opts, defense=defense,
                               defense_params=defense_params, key_file=key_file, adapt=adapt)
        with server:
            log.info("serving %s at %s (pid %d)", Path(bundle).name, server.url, server.pid)
            client = OIPClient(server.url, server.model_name, timeout_s=30.0)
            try:
                yield client
            finally:
                client.close()
        client.deployment_state = server.final_state
        return
    if mode != "in-process":
        raise ConfigError(f"unknown deployment mode {mode!r}; choose 'server' or 'in-process'")
    from mexit.serve.factory import build_served_runtime

    served = build_served_runtime(bundle, backend=backend, threads=threads, backend_opts=backend_opts,
                                  defense=defense, defense_params=defense_params, key_file=key_file, adapt=adapt)
    client = LocalClient(served.runtime, model_name=served.model_name, expose=expose,  # type: ignore[arg-type]
                         expose_exit=expose_exit)
    try:
        yield client
    finally:
        client.deployment_state = runtime_state(served.runtime)
        close = getattr(served.runtime, "close", None)
        if callable(close):
            close()
