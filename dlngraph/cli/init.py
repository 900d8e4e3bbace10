"""`dlngraph init`: scaffold a spec and a small data folder from a template."""

from __future__ import annotations

from enum import Enum
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import typer

from dlngraph.errors import DlngraphError


class Template(str, Enum):
    dln1 = "dln1"
    dln2 = "dln2"
    deep_thinking = "deep-thinking"


def scaffold_files(template: Template) -> dict[str, bytes]:
    """Relative path -> content of every file the template ships, sorted."""
    out: dict[str, bytes] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif not child.name.startswith("."):
                out[f"{prefix}{child.name}"] = child.read_bytes()

    walk(files("dlngraph") / "scaffolds" / template.value, "")
    return dict(sorted(out.items()))


def init_cmd(
    directory: Path = typer.Argument(..., help="Where to create spec.yaml and data/ (created if missing)."),
    template: Template = typer.Option(Template.dln1, "--template", "-t", help="Which network to start from."),
    force: bool = typer.Option(False, "--force", help="Overwrite files that already exist (never a directory or device)."),
) -> None:
    """Create DIRECTORY/spec.yaml and DIRECTORY/data/ from a template that compiles and fits as is.

    Templates: dln1 (one trained prompt, MPQA sentiment), dln2 (a hidden reasoning layer
    and an answer layer, SUBJ), deep-thinking (K/V tuning over demonstrations, hyperbaton).

    Examples:

      dlngraph init my-net

      dlngraph init my-net --template dln2
    """
    from dlngraph.runtime.files import check_output, write_atomic

    content = scaffold_files(template)
    clashes = sorted(p for p in content if (directory / p).exists())
    if clashes and not force:
        raise DlngraphError(
            f"error: {directory} already has {', '.join(clashes)}\n  = help: pick another directory or pass --force"
        )
    targets = {check_output(directory / relative, force=True): data for relative, data in content.items()}
    for target, data in targets.items():
        write_atomic(target, data.decode("utf-8"))
    spec = directory / "spec.yaml"
    typer.echo(f"created {spec} and {directory / 'data'}/ from the {template.value} template")
    typer.echo("next:")
    for step in (f"dlngraph compile {spec}", f"dlngraph fit {spec}", "dlngraph report runs/<name>-<timestamp>"):
        typer.echo(f"  {step}")


def register(app: typer.Typer) -> None:
    app.command("init")(init_cmd)
