"""``mexit report``: rebuild an audit's report.html from its results.json and artifacts."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="Print only the report path.")
def command(run_dir: Path, quiet: bool) -> None:
    """Rebuild RUN_DIR/report.html (a finished `mexit audit` run) without re-running anything."""
    from mexit.audit.report import build_report, summary_table
    from mexit.audit.results import load_results

    path = build_report(run_dir)
    if not quiet:
        click.echo(summary_table(load_results(run_dir)))
    click.echo(f"report: {path}")
