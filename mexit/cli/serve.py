"""``mexit serve``: serve an exported bundle over the Open Inference Protocol (KServe V2 / Triton HTTP)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 serves on every interface.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to bind (0 picks a free one).")
@click.option("--model-name", default=None, help="Model name in the URLs (default: from the bundle).")
@click.option("--expose", type=click.Choice(["probabilities", "label"]), default="probabilities", show_default=True,
              help="What responses reveal: full probability vectors, or labels only.")
@click.option("--expose-exit", is_flag=True,
              help="Also return each sample's exit index (the paper's Adversary 1; off by default).")
@click.option("--backend", default="onnxruntime", show_default=True, help="Runtime backend.")
@click.option("--threads", type=int, default=1, show_default=True, help="Runtime intra-op threads.")
@click.option("--max-body-mb", type=float, default=4.0, show_default=True, help="Largest request body (MiB).")
@click.option("--max-batch", type=int, default=1024, show_default=True, help="Largest batch per request.")
@click.option("--timeguard-sigma", type=float, default=None, metavar="MS",
              help="Enable TimeGuard with this half-normal delay scale, in milliseconds.")
@click.option("--key-file", type=click.Path(path_type=Path), default=None,
              help="TimeGuard key file (default: the MEXIT_TIMEGUARD_KEY environment variable).")
@click.option("--pad-to-final", is_flag=True,
              help="Constant-time defense instead: release every response at the final exit's time.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="warning", show_default=True, help="Server log level.")
def command(bundle: Path, host: str, port: int, model_name: str | None, expose: str, expose_exit: bool,
            backend: str, threads: int, max_body_mb: float, max_batch: int, timeguard_sigma: float | None,
            key_file: Path | None, pad_to_final: bool, log_level: str) -> None:
    """Serve BUNDLE over the Open Inference Protocol until Ctrl-C."""
    from mexit.serve.factory import build_served_runtime, max_body_bytes
    from mexit.serve.server import serve

    served = build_served_runtime(bundle, backend=backend, threads=threads, sigma_ms=timeguard_sigma,
                                  key_file=key_file, pad_to_final=pad_to_final)
    name = model_name or served.model_name
    defense = ("TimeGuard" if timeguard_sigma is not None else "constant-time padding" if pad_to_final else "none")

    def on_bound(url: str) -> None:
        click.echo(f"serving {name!r} at {url}/v2/models/{name} (exposes {expose}"
                   f"{' + exit index' if expose_exit else ''}; defense: {defense}); Ctrl-C to stop")

    serve(served.runtime, host=host, port=port, log_level=log_level, on_bound=on_bound, model_name=name,
          expose=expose, expose_exit=expose_exit, max_body_bytes=max_body_bytes(max_body_mb), max_batch=max_batch,
          metadata_extra=served.metadata)
