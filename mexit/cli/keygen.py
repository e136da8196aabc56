"""``mexit keygen``: write a fresh random TimeGuard key file (hex, mode 0600). The key is never printed."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Key file to write (hex text, mode 0600).")
@click.option("--bytes", "n_bytes", type=click.IntRange(min=32), default=32, show_default=True,
              help="Key length in bytes (at least 32).")
@click.option("--force", is_flag=True, help="Replace an existing key file (changes every TimeGuard delay).")
def command(out: Path, n_bytes: int, force: bool) -> None:
    """Generate a secret key for TimeGuard's per-input delays."""
    from mexit.defense.keys import DEFAULT_KEY_ENV, write_key_file

    path = write_key_file(out, force=force, n=n_bytes)
    click.echo(f"wrote a {n_bytes}-byte TimeGuard key to {path} (mode 0600); keep it secret and stable. "
               f"Use it via its path or by setting {DEFAULT_KEY_ENV} to the file's contents.")
