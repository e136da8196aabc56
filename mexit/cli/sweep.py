"""``mexit sweep``: many audits from a grid file, on a local process pool or Ray, in one comparison table."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("sweep")
@click.argument("grid_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/sweep"), show_default=True,
              help="Sweep directory: one audit run per combination under runs/, tables at the top.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine; ray: Ray tasks (needs mexit[ray]).")
@click.option("--address", default=None,
              help="Ray cluster to join: auto (the one `ray start` left running), host:port, or ray://host:10001 "
                   "(needs ray[client]); every node needs mexit and --out on a shared filesystem. Default: "
                   "RAY_ADDRESS if set, else a private local Ray instance with workers x threads CPUs.")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Audits run at once (pool processes, or Ray tasks in flight).")
@click.option("--threads", type=int, default=None,
              help="torch/BLAS threads per audit, also the CPUs each Ray task reserves (default: cores / workers).")
@click.option("--no-report", is_flag=True,
              help="Skip each run's report.html (only the tables); `mexit report RUN_DIR` builds one later.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(grid_file: Path, out_dir: Path, executor: str, address: str | None, workers: int,
            threads: int | None, no_report: bool, no_progress: bool) -> None:
    """Run every audit of GRID_FILE (datasets x architectures x exit counts x seeds) and aggregate them."""
    from mexit.audit.sweep import markdown_table, run_sweep

    result = run_sweep(grid_file, out_dir, executor=executor, workers=workers,  # type: ignore[arg-type]
                       address=address, threads=threads, progress=not no_progress, report=not no_report)
    click.echo(markdown_table(result["runs"]))
    failed = [r["run"] for r in result["runs"] if r.get("status") != "ok"]
    click.echo(f"{len(result['runs'])} audits in {result['wall_seconds']:.0f} s on {executor} with {workers} workers"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    click.echo(f"table: {Path(out_dir) / 'sweep.md'} (also sweep.csv, sweep.json)")
