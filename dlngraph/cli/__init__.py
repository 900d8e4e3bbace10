"""The `dlngraph` command line: one module per subcommand.

Each module in `_COMMANDS` defines `register(app)`. Errors that dlngraph
reports to users (`DlngraphError`) are printed without a traceback and set
the exit code (2 for a spec error).
"""

from __future__ import annotations

import importlib
import sys

import typer

from dlngraph import __version__
from dlngraph.cli import verbosity
from dlngraph.errors import DlngraphError

_COMMANDS = ("cache", "compile", "doctor", "eval", "explain", "export", "fit", "init", "report", "run", "schema")

app = typer.Typer(
    name="dlngraph",
    help="Compile, run and train deep language networks described in YAML.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dlngraph {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-vv for debug)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    verbosity.configure(verbose)


for _name in _COMMANDS:
    importlib.import_module(f"dlngraph.cli.{_name}").register(app)


# The usage-error base class of the click that typer runs on: older typer uses
# the `click` package, newer typer (0.29) a bundled copy of it whose classes
# `click.ClickException` does not match. typer's BadParameter derives from it either way.
_CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        # Without standalone mode typer returns (not raises) the code of an Exit,
        # including the 130 it makes of a KeyboardInterrupt.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except DlngraphError as exc:
        typer.echo(exc.render(), err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERROR as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
