"""The ``mexit`` command line: a thin click shell over the library.

Each command parses its options, calls one library function and prints a short summary. User errors
(:class:`mexit.errors.UserError`, click usage errors) print one line and exit with code 2; anything
else is a bug and keeps its traceback. Heavy imports (torch, onnxruntime) happen inside the commands,
so ``mexit --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from mexit import __version__
from mexit.errors import UserError

EXIT_USER_ERROR = 2


class _Group(click.Group):
    """A click group that turns :class:`UserError` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mexit")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Audit and defend the membership privacy of multi-exit networks as they are deployed."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    # One module per command keeps each thin and lets stages own their command's options.
    from mexit.cli import attack as _attack
    from mexit.cli import audit as _audit
    from mexit.cli import export as _export
    from mexit.cli import keygen as _keygen
    from mexit.cli import report as _report
    from mexit.cli import serve as _serve
    from mexit.cli import sweep as _sweep
    from mexit.cli import train as _train

    for module in (_train, _export, _serve, _attack, _audit, _report, _sweep, _keygen):
        cli.add_command(module.command)


_register_commands()


def _alias(name: str) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(cli.main(args=[name, *sys.argv[1:]], prog_name=f"mexit-{name}", standalone_mode=True))

    return entry


def main() -> None:
    """Console-script entry point for ``mexit``."""
    cli.main(prog_name="mexit")


train_main = _alias("train")
export_main = _alias("export")
serve_main = _alias("serve")
attack_main = _alias("attack")
