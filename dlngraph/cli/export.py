"""`dlngraph export`: the spec with learned prompts filled in."""

from __future__ import annotations

from pathlib import Path

import typer

from dlngraph.cli.options import FORCE


def export_cmd(
    spec: Path = typer.Argument(..., help="Path to the spec YAML."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Learned prompts (YAML from `fit`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the fitted spec."),
    force: bool = FORCE,
) -> None:
    """Write SPEC with the checkpoint's prompts in place of the nodes' prompts; the result is compiled."""
    from dlngraph.api import compile_spec, export, input_files
    from dlngraph.runtime.files import check_output

    check_output(out, protected=input_files(compile_spec(spec), checkpoint), force=force)
    written = export(spec, checkpoint, out)
    compile_spec(written)  # a fitted spec that does not compile is an error now, not later
    typer.echo(f"wrote {written}")


def register(app: typer.Typer) -> None:
    app.command(
        "export",
        epilog="Example:\n\n  dlngraph export specs/dln1-mpqa.yaml --checkpoint runs/demo/best.yaml -o fitted.yaml",
    )(export_cmd)
