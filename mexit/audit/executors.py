"""Where independent tasks run: a local process pool or Ray, with crash rows and capped concurrency.

Used by the sweep (one audit per task) and by reference-model training (one model per task); neither imports
the other. :func:`map_tasks` is the entry point; ``fn`` must be a module-level function (it is pickled).
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import logging
import os
import site
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from mexit.errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)

RAY_HINT = "pip install 'mexit[ray]' (or pip install ray)"
PROBE_TIMEOUT_S = 5.0


def _crash_row(error: str, detail: str | None = None) -> dict[str, Any]:
    """The row of a task whose worker failed before ``run_one`` could report (a crash, a lost node)."""
    return {"status": "crashed", "error": error, "traceback": detail, "seconds": None}


def _ray_address(address: str | None) -> str | None:
    """The cluster to join (``--address``, else ``RAY_ADDRESS``), or None to start a local instance."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def _probe(address: str) -> None:
    """Fail fast, in one line, when nothing listens at ``address``.

    ray.init retries an unreachable GCS for about 15 minutes while its C++ core prints warnings, which reads
    as a hang; a plain TCP connect says the same in seconds. ``auto`` is resolved the way ray.init resolves it
    (RAY_ADDRESS, else the cluster ``ray start`` recorded, which may be long dead) before probing.
    """
    target = address
    if address == "auto":
        try:  # private helper, but the only way to probe what ray.init would join; if it moves, skip the probe
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:
            return
        try:
            target = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError as exc:
            raise BackendUnavailableError(f"--address auto found no running Ray cluster ({str(exc).splitlines()[0]}); "
                                          "start one with `ray start --head`, or pass host:port") from None
    host, sep, port = target.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: Ray reports the format
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        where = address if target == address else f"{address} ({target})"
        raise BackendUnavailableError(
            f"no Ray cluster answers at {where} ({exc.strerror or str(exc) or type(exc).__name__}); start one with "
            "`ray start --head`, fix --address (or RAY_ADDRESS), or leave it out to use a local Ray instance"
        ) from None


def _worker_env() -> dict[str, Any] | None:
    """A runtime env that lets local Ray workers import mexit from where this process did, when they could not.

    Workers see this process's environment, working directory and site-packages; only a checkout imported
    through some other ``sys.path`` entry needs PYTHONPATH. A job-level runtime env costs seconds (Ray cannot
    use its pre-started workers), so it is only set then.
    """
    root = Path(__file__).resolve().parents[2]
    seen = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep), *site.getsitepackages(),
            site.getusersitepackages()]
    if any(p and Path(p).resolve() == root for p in seen):
        return None
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _ray_init(ray: Any, address: str | None, cpus: int) -> None:
    """Join ``address`` or start a private local instance with ``cpus`` CPUs; Ray's chatter stays out of our output."""
    # Ray's own INFO/WARNING lines (instance started, token auth enabled...) would interleave with the summary;
    # they come back with -v. Worker stdout/stderr (per-audit warnings and bars) stay in Ray's log files.
    quiet = {"log_to_driver": False, "configure_logging": True,
             "logging_level": logging.INFO if log.isEnabledFor(logging.INFO) else logging.ERROR}
    if address is None:
        # "local": a new instance even if `ray start` left one running (ray.init() would join that one, and
        # refuse num_cpus).
        env = _worker_env()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **({"runtime_env": env} if env else {}),
                 **quiet)
        return
    _probe(address)
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        # Ray says only "Failed to connect"; the usual causes are a version mismatch and token authentication
        # (on by default for local clusters since Ray 2.59): a driver sends its token only with RAY_AUTH_MODE=token.
        lines = str(exc).strip().splitlines()
        hint = "" if isinstance(exc, ValueError) else (f" (it must run Ray {ray.__version__}; if it uses token "
                                                       "authentication, set RAY_AUTH_MODE=token here)")
        raise BackendUnavailableError(f"cannot join the Ray cluster at {address}: "
                                      f"{lines[0] if lines else type(exc).__name__}{hint}") from None


def _ray_failure(ray: Any, exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        error = f"{type(exc.cause).__name__}: {exc.cause}"
    else:
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return _crash_row(error.splitlines()[0], str(exc))


def _ray_map(fn: Callable[..., dict[str, Any]], calls: Sequence[tuple[Any, ...]], *, workers: int, threads: int,
             address: str | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """``fn(*call)`` for every call as Ray tasks (``threads`` CPUs each, at most ``workers`` in flight), in order.

    A task whose worker dies (crash, out-of-memory kill, lost node) gets a ``crashed`` row; the others keep
    theirs. ``fn`` must be importable by the workers (a module-level function).
    """
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    from tqdm.auto import tqdm

    started_here = not ray.is_initialized()
    original_print = builtins.print  # Ray's tqdm support replaces builtins.print process-wide; put it back after
    if started_here:
        address = _ray_address(address)
        t0 = time.perf_counter()
        try:
            _ray_init(ray, address, workers * threads)
        except BaseException:
            if ray.is_initialized():
                ray.shutdown()
            raise
        log.info("Ray %s: %s in %.1f s", ray.__version__, f"joined {address}" if address else "local instance",
                 time.perf_counter() - t0)
    elif address:
        log.warning("Ray is already initialised in this process; using that cluster, not %s", address)
    rows: list[dict[str, Any] | None] = [None] * len(calls)
    pending: dict[Any, int] = {}
    bar = tqdm(total=len(calls), desc="sweep", unit="audit", disable=not progress)
    try:
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if threads > largest > 0:
            log.warning("each audit asks Ray for %d CPUs but the largest node has %g: tasks wait for a node that "
                        "large (pass --threads)", threads, largest)
        # No retries: a crash (an out-of-memory kill, a native fault) would mostly crash again; the row says so,
        # and re-running the sweep resumes every audit from its cache.
        remote = ray.remote(num_cpus=threads, max_retries=0)(fn)
        queue = iter(enumerate(calls))
        for i, call in itertools.islice(queue, workers):
            pending[remote.remote(*call)] = i
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    rows[i] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    rows[i] = _ray_failure(ray, exc)
                    log.warning("sweep task %d failed in Ray: %s", i, rows[i]["error"])
                bar.update()
                for j, call in itertools.islice(queue, 1):
                    pending[remote.remote(*call)] = j
    finally:
        bar.close()
        for ref in pending:  # interrupted: do not leave audits running on a cluster
            with contextlib.suppress(Exception):  # best effort while unwinding
                ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
            builtins.print = original_print
    return [r if r is not None else _crash_row("no result") for r in rows]


def _local_map(fn: Callable[..., dict[str, Any]], calls: Sequence[tuple[Any, ...]], *, workers: int,
               progress: bool = False) -> list[dict[str, Any]]:
    """``fn(*call)`` for every call on a spawned process pool of ``workers``, in order; a dead worker's calls
    get ``crashed`` rows, the finished ones keep theirs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    # spawn: a forked child would inherit torch's and ONNX Runtime's thread pools in an unknown state.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *call) for call in calls]
        rows = []
        for fut in tqdm(futures, desc="sweep", unit="audit", disable=not progress):
            try:
                rows.append(fut.result())
            except Exception as exc:  # BrokenProcessPool: a worker was killed (e.g. out of memory)
                rows.append(_crash_row(f"{type(exc).__name__}: {exc}"))
                log.warning("sweep task %d failed in the process pool: %s", len(rows) - 1, rows[-1]["error"])
    return rows


def map_tasks(fn: Callable[..., dict[str, Any]], calls: Sequence[tuple[Any, ...]], *,
              executor: Literal["local", "ray"] = "local", workers: int = 2, threads: int = 1,
              address: str | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """``fn(*call)`` for every call on the sweep's executors (the hook other stages use, e.g. reference models).

    Rows come back in order; a task whose worker died gets a ``crashed`` row. ``fn`` must be a module-level
    function. One worker runs the calls in this process (no pool to spawn).
    """
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    if workers < 1 or threads < 1:
        raise ConfigError(f"workers and threads must be >= 1, got {workers} and {threads}")
    if executor == "ray":
        return _ray_map(fn, calls, workers=workers, threads=threads, address=address, progress=progress)
    if workers == 1:
        return [fn(*call) for call in calls]
    return _local_map(fn, calls, workers=workers, progress=progress)
