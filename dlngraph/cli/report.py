"""`dlngraph report`: turn a run directory into one self-contained HTML page."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import typer

from dlngraph.cli.options import FORCE


def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by `dlngraph fit`."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write (default RUN_DIR/report.html)."),
    force: bool = FORCE,
    open_: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
) -> None:
    """Write an HTML report of RUN_DIR: network, curves, prompt diffs, posteriors, flips, cost.

    The page is a single file with inline CSS and SVG; it loads nothing from the network.

    Examples:

      dlngraph report runs/mpqa-dln1-20260101-120000

      dlngraph report runs/mpqa-dln1-20260101-120000 -o mpqa.html --open
    """
    from dlngraph.report import write_report

    path = write_report(run_dir, out, force=force)
    typer.echo(str(path))
    if open_:
        webbrowser.open(path.resolve().as_uri())


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
