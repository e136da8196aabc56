"""Running the OIP application: :func:`serve` in this process, :class:`ServerProcess` in a child one.

One uvicorn worker only: the runtime holds the model (ONNX Runtime sessions, a TensorRT engine) and
is shared by all requests; more processes would load the model again and compete for the same cores,
blurring the latency that both TimeGuard and the timing attacks measure.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mexit.errors import ConfigError, UserError
from mexit.runtime.types import Runtime
from mexit.serve.app import create_app

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: More concurrent connections than this get a 503 instead of queueing without bound.
DEFAULT_LIMIT_CONCURRENCY = 256
DEFAULT_KEEP_ALIVE_S = 15
_BACKLOG = 2048


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port=0``: a free port), or a :class:`UserError` if taken.

    Binding here rather than inside uvicorn turns "address in use" into one actionable line, and lets
    a caller learn the real port of ``port=0`` before the server starts.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r} ({exc.strerror}); pass --host 127.0.0.1 or an address "
                          f"of this machine") from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # no TIME_WAIT wait after a restart
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; pass --port with a free port (or --port 0 to "
                            f"pick one)") from None
        if exc.errno == errno.EACCES:
            raise UserError(f"no permission to bind port {port} on {host}; use a port >= 1024") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"{host} is not an address of this machine; pass --host 127.0.0.1 (local only) "
                            f"or 0.0.0.0 (all interfaces)") from None
        raise UserError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    """``http://host:port`` for a bound socket (IPv6 hosts bracketed)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    runtime: Runtime,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_level: str = "warning",
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY,
    timeout_keep_alive: int = DEFAULT_KEEP_ALIVE_S,
    on_bound: Callable[[str], None] | None = None,
    on_plan: Callable[[Any], None] | None = None,
    on_stop: Callable[[], None] | None = None,
    **app_opts: Any,
) -> None:
    """Serve ``runtime`` over the Open Inference Protocol until interrupted (SIGINT/SIGTERM).

    ``app_opts`` go to :func:`mexit.serve.app.create_app` (``model_name`` is required there).
    ``on_bound(url)`` is called once the port is bound, before requests are accepted (the CLI prints
    the URL; ``mexit serve --info-file`` writes it for :class:`ServerProcess`). ``on_plan(plan)`` gets the
    :class:`mexit.serve.app.PredictPlan` the app chose (the CLI prints ``plan.describe()``). ``on_stop()`` is called
    after a graceful shutdown has closed every connection, before uvicorn re-raises the signal that stopped it (a
    re-raised SIGTERM ends the process, so code after ``serve`` would not run).
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            if on_stop is not None:
                on_stop()

    app = create_app(runtime, **app_opts)
    if on_plan is not None:
        on_plan(app.state.predict_plan)
    sock = bind_socket(host, port)
    try:
        sock.listen(_BACKLOG)  # connections made as soon as the URL is announced wait in the backlog
        url = socket_url(sock)
        if on_bound is not None:
            on_bound(url)
        config = uvicorn.Config(
            app,
            log_level=log_level,
            log_config=None,  # leave logging to the application (the CLI's -v), not uvicorn's dictConfig
            access_log=log_level in ("debug", "trace"),
            lifespan="off",
            workers=1,
            limit_concurrency=limit_concurrency,
            timeout_keep_alive=timeout_keep_alive,
            server_header=False,  # nothing beyond the protocol in headers
            backlog=_BACKLOG,
        )
        logger.info("serving %s at %s", app_opts.get("model_name"), url)
        try:
            Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C it captured
            logger.info("server stopped")
    finally:
        sock.close()


def _health_ready(url: str) -> bool:
    """Whether ``GET url/v2/health/ready`` answers 200 right now."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=1.0)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _cli_value(value: Any) -> str:
    """A backend option's value as ``--backend-opt KEY=VALUE`` spells it (``true``/``false``, ``none``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


class ServerProcess:
    """``mexit serve …`` (``python -m mexit.cli serve``) in a child process on a free loopback port.

    For tests, benchmarks and the audit.

    Starts on ``__enter__`` (or :meth:`start`), waits until ``/v2/health/ready`` answers, and always
    terminates the child on ``__exit__`` (or :meth:`stop`), also when the body raised. Give either a
    ``bundle`` directory, or a ``factory`` (``"module:callable"`` returning a Runtime, with JSON-able
    ``factory_kwargs``). ``url``, ``model_name`` and ``pid`` are known once started. ``backend_opts``: the
    backend's own options, passed as ``--backend-opt KEY=VALUE`` (the child coerces them to the option's type).
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str] | None = None,
        *,
        factory: str | None = None,
        factory_kwargs: dict[str, Any] | None = None,
        host: str = DEFAULT_HOST,
        port: int = 0,
        model_name: str | None = None,
        expose: str = "probabilities",
        expose_exit: bool = False,
        backend: str | None = None,
        threads: int | None = None,
        backend_opts: Mapping[str, Any] | None = None,
        max_body_mb: float | None = None,
        max_batch: int | None = None,
        defense: str | None = None,
        defense_params: Mapping[str, Any] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        adapt: bool = True,
        log_level: str = "warning",
        startup_timeout_s: float = 60.0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if (bundle is None) == (factory is None):
            raise ConfigError("ServerProcess needs exactly one of bundle= or factory=")
        args: list[str] = [] if bundle is None else [str(bundle)]
        if factory is not None:
            args += ["--factory", factory]
            if factory_kwargs:
                args += ["--factory-kwargs", json.dumps(factory_kwargs)]
        args += ["--host", host, "--port", str(port), "--expose", expose, "--log-level", log_level]
        optional = {
            "--model-name": model_name, "--backend": backend, "--threads": threads, "--max-body-mb": max_body_mb,
            "--max-batch": max_batch, "--defense": defense, "--key-file": key_file,
        }
        for flag, value in optional.items():
            if value is not None:
                args += [flag, str(value)]
        for key, value in (backend_opts or {}).items():
            args += ["--backend-opt", f"{key}={_cli_value(value)}"]
        for key, value in (defense_params or {}).items():
            args += ["--param", f"{key}={value}"]
        if expose_exit:
            args.append("--expose-exit")
        if not adapt:
            args.append("--no-adapt")
        self.args = [*args, *extra_args]
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.url: str = ""
        self.model_name: str = ""
        self.info: dict[str, Any] = {}
        #: After :meth:`stop`: what the served runtime reported on its clean shutdown (a timing defense's
        #: ``describe()``: its schedule, refits and overruns), or None.
        self.final_state: dict[str, Any] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: Any = None
        self.last_log = ""  # the child's output, kept after stop() for post-mortems

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server process is not running")
        return self._proc.pid

    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Launch the child and wait for readiness; on any failure the child is stopped first."""
        if self._proc is not None:
            raise RuntimeError("ServerProcess already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="mexit-serve-")
        info_file = Path(self._tmp.name) / "info.json"
        log_path = Path(self._tmp.name) / "server.log"
        cmd = [sys.executable, "-m", "mexit.cli", "serve", *self.args, "--info-file", str(info_file),
               "--state-file", str(Path(self._tmp.name) / "state.json"), "--exit-with-parent"]
        env = dict(os.environ if self.env is None else self.env)
        # The child imports the same mexit as this process, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env)
            self._wait_ready(info_file)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, info_file: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise UserError(f"the mexit server exited with code {code} during start-up:\n{self.log_tail()}")
            if not self.info and info_file.exists():
                with contextlib.suppress(ValueError, OSError, KeyError):
                    info = json.loads(info_file.read_text())
                    self.url, self.model_name, self.info = info["url"], info["model_name"], info
            if self.url and _health_ready(self.url):
                return
            if time.monotonic() > deadline:
                raise UserError(f"the mexit server did not become ready within {self.startup_timeout_s:.0f} s:\n"
                                f"{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's combined stdout/stderr."""
        if self._tmp is None:
            return ""
        try:
            text = (Path(self._tmp.name) / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after ``timeout_s``) and clean up. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("the mexit server (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self.last_log = self.log_tail(200)
            with contextlib.suppress(ValueError, OSError):
                self.final_state = json.loads((Path(self._tmp.name) / "state.json").read_text())["runtime"]
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def exit_with_parent(poll_s: float = 0.5) -> None:
    """SIGTERM ourselves (a graceful uvicorn shutdown) once the parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
