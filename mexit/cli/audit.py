"""``mexit audit``: run (or resume) the end-to-end membership-leakage audit and print where the report is."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _epilog() -> str:
    from mexit.defense.registry import describe_defenses
    from mexit.runtime.registry import backend_names

    return ("\b\nDefenses for [[defenses]] entries (name, params):\n" + describe_defenses()
            + "\n\n\bBackends for deployment.backend: " + ", ".join(backend_names()) + ".")


@click.command("audit", epilog=_epilog())
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/audit"), show_default=True,
              help="Run directory: stages are cached there, so re-running resumes.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set target.epochs=5 --set deployment.mode=in-process "
                   "(values are TOML literals). Repeatable.")
@click.option("--print-config", is_flag=True, help="Print the validated config (with defaults) and exit.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def command(config: Path | None, out_dir: Path, overrides: tuple[str, ...], print_config: bool,
            no_progress: bool) -> None:
    """Audit a multi-exit deployment: train, deploy, attack, evaluate TimeGuard, write a report.

    CONFIG is a TOML (or YAML) audit config; without it the built-in default runs on the embedded
    digits data (FCN-18-1 with 4 exits, a real server on loopback).
    """
    from mexit.audit.config import load_config

    cfg = load_config(config, overrides)
    if print_config:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from mexit.audit.pipeline import run_audit
    from mexit.audit.report import summary_table
    from mexit.audit.results import REPORT_FILE, RESULTS_FILE

    results = run_audit(cfg, out_dir, progress=not no_progress)
    click.echo(summary_table(results))
    click.echo(f"\naudit finished in {results['wall_seconds']:.0f} s")
    click.echo(f"results: {out_dir / RESULTS_FILE}")
    click.echo(f"report:  {out_dir / REPORT_FILE}")
