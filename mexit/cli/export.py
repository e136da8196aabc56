"""``mexit export``: turn a finished training run into a deployable bundle (and optionally TensorRT engines)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--engine", type=click.Choice(["none", "tensorrt"]), default="none", show_default=True,
              help="Also build TensorRT engines for this machine's GPU (needs mexit[tensorrt] and an NVIDIA GPU).")
@click.option("--fp16", is_flag=True, help="Build FP16 TensorRT engines (re-calibrate the threshold for them).")
@click.option("--max-batch", type=int, default=256, show_default=True, help="Largest batch the TensorRT engines take.")
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
def command(run_dir: Path, out_dir: Path, engine: str, fp16: bool, max_batch: int, overwrite: bool, tolerance: float,
            samples: int, exporter: str, data_root: Path | None, threshold: float | None) -> None:
    """Export the model of RUN_DIR as per-exit ONNX stages with a verified manifest."""
    from mexit.errors import ConfigError
    from mexit.export import export_bundle
    from mexit.train.runner import load_run

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if fp16 and engine != "tensorrt":
        raise ConfigError("--fp16 only applies to --engine tensorrt")
    if engine == "tensorrt":  # fail before the export work when TensorRT cannot be used here
        from mexit.export.tensorrt import import_tensorrt

        import_tensorrt()
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

        engines = build_engines(bundle_dir, fp16=fp16, max_batch=max_batch)
        click.echo(f"TensorRT engines written to {engines}")


def _config_record(config: object) -> object:
    """The training config as JSON-ready data for the bundle's provenance."""
    dump = getattr(config, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(config)
