"""Deploy a bundle the way the audit's attacker meets it, and hand back a client for it.

``mode="server"`` starts a real ``mexit serve`` child process on loopback (:class:`ServerProcess`) and
returns an :class:`OIPClient`; the child is stopped when the ``with`` block ends — normally, on an
error, or on Ctrl-C. ``mode="in-process"`` loads the runtime here and returns a :class:`LocalClient`
(no HTTP: faster, for tests and sweeps, but without the serving stack's latency). Both can apply
TimeGuard (``sigma_ms`` + ``key_file``) or constant-time padding exactly as ``mexit serve`` does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mexit.serve.client import LocalClient, OIPClient
from mexit.serve.server import DEFAULT_HOST, ServerProcess, bind_socket

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def deployed(
    bundle: str | Path,
    *,
    mode: str,
    expose: str = "probabilities",
    expose_exit: bool = False,
    threads: int = 1,
    port: int = 0,
    sigma_ms: float | None = None,
    key_file: str | Path | None = None,
    pad_to_final: bool = False,
) -> Iterator[Any]:
    """A client of ``bundle`` deployed in ``mode`` ("server" or "in-process"); always torn down on exit."""
    if mode == "server":
        check_port_free(port)
        server = ServerProcess(bundle, port=port, expose=expose, expose_exit=expose_exit, threads=threads,
                               timeguard_sigma_ms=sigma_ms, key_file=key_file, pad_to_final=pad_to_final)
        with server:
            log.info("serving %s at %s (pid %d)", Path(bundle).name, server.url, server.pid)
            client = OIPClient(server.url, server.model_name, timeout_s=30.0)
            try:
                yield client
            finally:
                client.close()
        return
    from mexit.serve.factory import build_served_runtime

    served = build_served_runtime(bundle, threads=threads, sigma_ms=sigma_ms, key_file=key_file,
                                  pad_to_final=pad_to_final)
    client = LocalClient(served.runtime, model_name=served.model_name, expose=expose,  # type: ignore[arg-type]
                         expose_exit=expose_exit)
    try:
        yield client
    finally:
        close = getattr(served.runtime, "close", None)
        if callable(close):
            close()
