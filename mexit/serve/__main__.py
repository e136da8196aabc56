"""``python -m mexit.serve BUNDLE [options]``: the ``mexit serve`` command without the console script.

Same options as ``mexit serve`` (see ``--help``), plus a few hidden ones that
:class:`mexit.serve.ServerProcess` uses: ``--factory``/``--factory-kwargs`` to serve a runtime built by
a Python callable instead of a bundle, ``--info-file`` to publish the bound URL and model name, and
``--exit-with-parent`` so a test or benchmark that dies never leaves a server behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from mexit.errors import UserError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mexit.serve",
                                description="Serve an early-exit bundle over the Open Inference Protocol.")
    p.add_argument("bundle", nargs="?", help="bundle directory written by `mexit export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", default=None, help="model name in URLs (default: from the bundle)")
    p.add_argument("--expose", choices=["probabilities", "label"], default="probabilities",
                   help="what responses reveal: full probability vectors or labels only")
    p.add_argument("--expose-exit", action="store_true",
                   help="also return each sample's exit index (the paper's Adversary 1; off by default)")
    p.add_argument("--backend", default="onnxruntime", help="runtime backend (default onnxruntime)")
    p.add_argument("--threads", type=int, default=1, help="runtime intra-op threads (default 1)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (default 4)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch per request (default 1024)")
    p.add_argument("--timeguard-sigma", type=float, default=None, metavar="MS",
                   help="enable TimeGuard with this half-normal delay scale in milliseconds")
    p.add_argument("--key-file", default=None, help="TimeGuard key file (default: $MEXIT_TIMEGUARD_KEY)")
    p.add_argument("--pad-to-final", action="store_true",
                   help="constant-time defense: release every response at the final exit's time")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--factory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--factory-kwargs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--info-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--predict-inline", action="store_true", help=argparse.SUPPRESS)  # see create_app
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.exit_with_parent:
        _exit_with_parent()
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def run(args: argparse.Namespace) -> None:
    """Build the runtime the options describe and serve it (blocks until SIGINT/SIGTERM)."""
    from mexit._io import atomic_write_json
    from mexit.errors import ConfigError
    from mexit.serve.factory import build_served_runtime, max_body_bytes, runtime_from_factory
    from mexit.serve.server import serve

    if (args.bundle is None) == (args.factory is None):
        raise ConfigError("give a bundle directory (or, for testing, --factory module:callable), not both")
    if args.factory is not None:
        served = runtime_from_factory(args.factory, args.factory_kwargs)
    else:
        served = build_served_runtime(args.bundle, backend=args.backend, threads=args.threads,
                                      sigma_ms=args.timeguard_sigma, key_file=args.key_file,
                                      pad_to_final=args.pad_to_final)
    model_name = args.model_name or served.model_name

    def on_bound(url: str) -> None:
        if args.info_file:
            atomic_write_json(args.info_file, {"url": url, "model_name": model_name, "pid": os.getpid()})
        print(f"serving model {model_name!r} at {url}/v2/models/{model_name} (Ctrl-C to stop)", flush=True)

    serve(
        served.runtime,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        on_bound=on_bound,
        model_name=model_name,
        expose=args.expose,
        expose_exit=args.expose_exit,
        max_body_bytes=max_body_bytes(args.max_body_mb),
        max_batch=args.max_batch,
        metadata_extra=served.metadata,
        predict_inline=args.predict_inline,
    )


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """SIGTERM ourselves (a graceful uvicorn shutdown) once the parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
