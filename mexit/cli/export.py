"""``mexit export``: turn a finished training run into a deployable bundle (and optionally TensorRT engines).

``mexit export BUNDLE --engines-only --engine tensorrt [--fp16]`` builds engines for this machine's GPU into
an existing bundle (the command the runtime names when a bundle has no engines for this GPU).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Bundle directory to write (required unless "
              "--engines-only).")
@click.option("--engines-only", is_flag=True,
              help="RUN_DIR is an existing bundle: only build TensorRT engines for this GPU into it.")
@click.option("--engine", type=click.Choice(["none", "tensorrt"]), default="none", show_default=True,
              help="Also build TensorRT engines for this machine's GPU (needs mexit[tensorrt] and an NVIDIA GPU).")
@click.option("--fp16", is_flag=True, help="Build FP16 TensorRT engines (re-calibrate the threshold for them).")
@click.option("--tf32", is_flag=True, help="Allow TF32 in FP32 TensorRT engines (off: keeps CPU parity).")
@click.option("--max-batch", type=int, default=256, show_default=True, help="Largest batch the TensorRT engines take.")
@click.option("--opt-batch", type=int, default=1, show_default=True,
              help="Batch size the TensorRT engines are tuned for.")
@click.option("--device", type=int, default=0, show_default=True, help="GPU index to build the TensorRT engines on.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Largest allowed |ONNX - PyTorch| logit difference (scaled by the logit magnitude when above 1).")
@click.option("--samples", type=int, default=64, show_default=True,
              help="Validation samples used for the parity check.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "legacy"]), default="auto", show_default=True,
              help="torch.onnx exporter: dynamo (falls back to legacy under auto) or the legacy TorchScript one.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Dataset directory, if it moved since training.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Exit threshold to deploy instead of the one the training run's search chose.")
def command(run_dir: Path, out_dir: Path | None, engines_only: bool, engine: str, fp16: bool, tf32: bool,
            max_batch: int, opt_batch: int, device: int, overwrite: bool, tolerance: float, samples: int,
            exporter: str, data_root: Path | None, threshold: float | None) -> None:
    """Export the model of RUN_DIR as per-exit ONNX stages with a verified manifest."""
    from mexit.errors import ConfigError

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if (fp16 or tf32) and engine != "tensorrt":
        raise ConfigError("--fp16 and --tf32 only apply to --engine tensorrt")
    if fp16 and tf32:
        raise ConfigError("--tf32 applies to FP32 engines; drop it with --fp16")
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"need 1 <= --opt-batch <= --max-batch, got {opt_batch} and {max_batch}")
    if engines_only and engine != "tensorrt":
        raise ConfigError("--engines-only builds TensorRT engines: add --engine tensorrt")
    if not engines_only and out_dir is None:
        raise ConfigError("--out is required (the bundle directory to write), unless --engines-only")
    if engine == "tensorrt":  # fail before the export work when TensorRT, cuda-python or the GPU is missing
        from mexit.export.tensorrt import check_build_support

        check_build_support(fp16=fp16, device_id=device)
    if engines_only:
        from mexit.export.tensorrt import build_engines

        engines = build_engines(run_dir, fp16=fp16, tf32=tf32, max_batch=max_batch, opt_batch=opt_batch,
                                device_id=device, overwrite=overwrite)
        click.echo(f"TensorRT engines written to {engines}")
        return
    assert out_dir is not None
    from mexit.export import export_bundle
    from mexit.train.runner import load_run

    run = load_run(run_dir, data_root=data_root)
    role = getattr(run.config, "role", "target")
    val_idx = run.splits.shadow_val if role == "shadow" else run.splits.target_val
    sample_inputs = run.dataset.inputs(val_idx[:samples])
    bundle_dir = export_bundle(
        run.model,
        out_dir,
        sample_inputs=sample_inputs,
        threshold=run.threshold if threshold is None else threshold,
        policy="max_prob",
        dataset_name=run.dataset.name,
        dataset_kind=run.dataset.kind,
        class_names=run.dataset.class_names,
        tolerance=tolerance,
        overwrite=overwrite,
        exporter=exporter,
        provenance_extra={"run_dir": str(run_dir), "config": _config_record(run.config)},
    )
    from mexit.bundle import load_bundle

    m = load_bundle(bundle_dir).manifest
    worst = max(m.parity.max_abs_diff)
    click.echo(f"exported {m.model.arch} ({m.model.num_exits} exits, {m.dataset.name}) to {bundle_dir}; "
               f"threshold {m.policy.threshold:.3f}; parity max |ONNX - torch| {worst:.2e} "
               f"on {m.parity.samples} samples")
    if engine == "tensorrt":
        from mexit.export.tensorrt import build_engines

        engines = build_engines(bundle_dir, fp16=fp16, tf32=tf32, max_batch=max_batch, opt_batch=opt_batch,
                                device_id=device)
        click.echo(f"TensorRT engines written to {engines}")


def _config_record(config: object) -> object:
    """The training config as JSON-ready data for the bundle's provenance."""
    dump = getattr(config, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(config)
