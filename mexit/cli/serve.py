"""``mexit serve``: serve an exported bundle over the Open Inference Protocol (KServe V2 / Triton HTTP).

The one definition of the serving options: :class:`mexit.serve.ServerProcess` runs this command in a child
process (``python -m mexit.cli serve``), with a few hidden options for tests, benchmarks and the audit.
Backends and defenses are listed from their registries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from mexit.defense.registry import defense_names, describe_defenses, parse_param_pairs
from mexit.errors import ConfigError
from mexit.runtime.registry import backend_names, backend_spec


def _defense_help() -> str:
    return "Timing defense to apply (default: none). " + "; ".join(describe_defenses().splitlines()) + "."


def resolve_defense(defense: str | None, params: tuple[str, ...], timeguard_sigma: float | None,
                    pad_to_final: bool) -> tuple[str | None, dict[str, str]]:
    """``--defense``/``--param`` with the older ``--timeguard-sigma`` and ``--pad-to-final`` as aliases."""
    chosen = {name for name, on in (("timeguard", timeguard_sigma is not None), ("padding", pad_to_final)) if on}
    if defense is not None:
        chosen.add(defense)
    if len(chosen) > 1:
        raise ConfigError(f"choose one defense, got {', '.join(sorted(chosen))}")
    kv = {k.replace("-", "_"): v for k, v in parse_param_pairs(params).items()}
    if timeguard_sigma is not None:
        kv.setdefault("sigma_ms", str(timeguard_sigma))
    name = next(iter(chosen), None)
    if name is None and kv:
        raise ConfigError(f"--param needs --defense NAME (one of {', '.join(defense_names())})")
    return name, kv


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False), required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 serves on every interface.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to bind (0 picks a free one).")
@click.option("--model-name", default=None, help="Model name in the URLs (default: from the bundle).")
@click.option("--expose", type=click.Choice(["probabilities", "label"]), default="probabilities", show_default=True,
              help="What responses reveal: full probability vectors, or labels only.")
@click.option("--expose-exit", is_flag=True,
              help="Also return each sample's exit index (the paper's Adversary 1; off by default).")
@click.option("--backend", default="onnxruntime", show_default=True, metavar="NAME",
              help=f"Runtime backend: {', '.join(backend_names())}.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runtime threads (every backend takes it).")
@click.option("--device", type=click.IntRange(min=0), default=None, help="GPU index for GPU backends.")
@click.option("--fp16", is_flag=True, help="Serve the bundle's FP16 TensorRT engines (exported with --fp16).")
@click.option("--backend-opt", "backend_opts", multiple=True, metavar="KEY=VALUE",
              help="A backend's own option, e.g. --backend-opt int8_heads=true (onnxruntime: 8-bit exit heads, "
                   "faster batch-1 early exits), --backend-opt provider=tensorrt (onnxruntime-gpu) or "
                   "--backend-opt cuda_graphs=false (torch). Repeatable.")
@click.option("--max-body-mb", type=float, default=4.0, show_default=True, help="Largest request body (MiB).")
@click.option("--max-batch", type=int, default=1024, show_default=True, help="Largest batch per request.")
@click.option("--defense", default=None, metavar="NAME", help=_defense_help())
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A defense parameter, e.g. --param sigma_ms=2 (repeatable).")
@click.option("--key-file", type=click.Path(path_type=Path), default=None,
              help="Defense key file (default: the MEXIT_TIMEGUARD_KEY environment variable).")
@click.option("--timeguard-sigma", type=float, default=None, metavar="MS",
              help="Alias of --defense timeguard --param sigma_ms=MS.")
@click.option("--pad-to-final", is_flag=True, help="Alias of --defense padding.")
@click.option("--adapt/--no-adapt", default=True, show_default=True,
              help="With a fitted defense (padding, optimal): refit its schedule on the compute times met live when "
                   "answers overrun it, and relax it again once overruns stay rare. --no-adapt keeps the start-up "
                   "calibration for the life of the server.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="warning", show_default=True, help="Server log level.")
@click.option("--factory", default=None, hidden=True, help="module:callable returning a Runtime (tests).")
@click.option("--factory-kwargs", default=None, hidden=True, help="JSON keyword arguments of --factory.")
@click.option("--info-file", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Write the bound URL and model name here (ServerProcess).")
@click.option("--exit-with-parent", is_flag=True, hidden=True, help="Stop when the parent process dies.")
@click.option("--state-file", type=click.Path(path_type=Path), default=None, hidden=True,
              help="On a clean stop, write what the served runtime reports (a defense's describe()) here.")
@click.option("--predict", type=click.Choice(["auto", "inline", "thread"]), default="auto", show_default=True,
              help="Where predictions run: on the event loop when a batch's worst case fits in 2 ms, measured at "
                   "start-up (auto; the thread hand-off costs ~0.2-0.7 ms), always on the event loop (inline: one "
                   "request then holds up the others), or always in worker threads.")
@click.option("--predict-inline", is_flag=True, hidden=True, help="Alias of --predict inline.")
def command(bundle: Path | None, host: str, port: int, model_name: str | None, expose: str, expose_exit: bool,
            backend: str, threads: int, device: int | None, fp16: bool, backend_opts: tuple[str, ...],
            max_body_mb: float, max_batch: int,
            defense: str | None, params: tuple[str, ...], key_file: Path | None, timeguard_sigma: float | None,
            pad_to_final: bool, adapt: bool, log_level: str, factory: str | None, factory_kwargs: str | None,
            info_file: Path | None, exit_with_parent: bool, state_file: Path | None, predict: str,
            predict_inline: bool) -> None:
    """Serve BUNDLE over the Open Inference Protocol until Ctrl-C."""
    from mexit._io import atomic_write_json
    from mexit.serve.factory import build_served_runtime, guard_runtime, max_body_bytes, runtime_from_factory
    from mexit.serve.server import exit_with_parent as watch_parent
    from mexit.serve.server import serve

    if exit_with_parent:
        watch_parent()
    if (bundle is None) == (factory is None):
        raise ConfigError("give a bundle directory (mexit export writes one)")
    backend_spec(backend)  # an unknown name: one line listing the registered ones, before anything is loaded
    from mexit.runtime.registry import parse_backend_options

    own_opts = parse_backend_options(backend, list(backend_opts))
    name_of_defense, defense_params = resolve_defense(defense, params, timeguard_sigma, pad_to_final)
    if name_of_defense is not None:
        from mexit.defense.registry import parse_defense

        parse_defense(name_of_defense, defense_params)  # a bad name or value fails now, before loading anything
    if factory is not None:
        served = runtime_from_factory(factory, factory_kwargs)
        if name_of_defense is not None:
            from dataclasses import replace

            served = replace(served, runtime=guard_runtime(served.runtime, name_of_defense, defense_params,
                                                           key_file=key_file, kind="tabular", adapt=adapt))
    else:
        served = build_served_runtime(bundle, backend=backend, threads=threads, device=device, fp16=fp16,
                                      backend_opts=own_opts, defense=name_of_defense, defense_params=defense_params,
                                      key_file=key_file, adapt=adapt)
    name = model_name or served.model_name
    shown = "none" if name_of_defense is None else f"{name_of_defense} {defense_params or ''}".strip()

    plan_text: list[str] = []

    def on_plan(plan: Any) -> None:  # called before on_bound; printed after the serving line
        plan_text.append(plan.describe())

    def on_bound(url: str) -> None:
        if info_file is not None:
            atomic_write_json(info_file, {"url": url, "model_name": name, "pid": os.getpid()})
        click.echo(f"serving {name!r} at {url}/v2/models/{name} (exposes {expose}"
                   f"{' + exit index' if expose_exit else ''}; defense: {shown}); Ctrl-C to stop")
        for text in plan_text:
            click.echo(f"predictions {text}")

    def on_stop() -> None:  # every connection closed: what the guard did while it ran (never sent to clients)
        if state_file is not None:
            from mexit.serve.deploy import runtime_state

            atomic_write_json(state_file, {"runtime": runtime_state(served.runtime)})

    serve(served.runtime, host=host, port=port, log_level=log_level, on_bound=on_bound, on_plan=on_plan,
          on_stop=on_stop, model_name=name, expose=expose, expose_exit=expose_exit,
          max_body_bytes=max_body_bytes(max_body_mb), max_batch=max_batch, metadata_extra=served.metadata,
          predict="inline" if predict_inline else predict)
