"""`dlngraph explain CODE`: what a diagnostic code means and how to fix it."""

from __future__ import annotations

import typer

from dlngraph.errors import DlngraphError

EPILOG = """Examples:

  dlngraph explain E301

  dlngraph explain unknown-key

  dlngraph explain --all
"""


def explain_cmd(
    code: str | None = typer.Argument(None, help="A code (E301) or its name (cycle)."),
    all_codes: bool = typer.Option(False, "--all", help="List every code."),
) -> None:
    """Explain a diagnostic code printed by `dlngraph compile`."""
    from dlngraph.codes import CODES, lookup

    if all_codes or code is None:
        for entry in CODES.values():
            typer.echo(f"{entry.code}  {entry.name:<22} {entry.summary}")
        return
    entry = lookup(code)
    if entry is None:
        raise DlngraphError(f"error: unknown code '{code}'; `dlngraph explain --all` lists them")
    typer.echo(f"{entry.code} ({entry.name}): {entry.summary}\n\n{entry.explanation}")


def register(app: typer.Typer) -> None:
    app.command("explain", epilog=EPILOG)(explain_cmd)
