"""`dlngraph compile`: check a spec and print its execution plan."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from dlngraph.errors import DlngraphError, SpecError

EPILOG = """Examples:

  dlngraph compile specs/dln2-subj.yaml

  dlngraph compile specs/wide-dag.yaml --format dot -o plan.dot

  dlngraph compile my-spec.yaml --error-format concise
"""


class PlanFormat(str, Enum):
    text = "text"
    json = "json"
    dot = "dot"
    mermaid = "mermaid"


class ErrorFormat(str, Enum):
    full = "full"
    concise = "concise"
    json = "json"


def register(app: typer.Typer) -> None:
    @app.command("compile", epilog=EPILOG)
    def compile_cmd(
        spec: Path = typer.Argument(..., help="Path to the spec YAML."),
        fmt: PlanFormat = typer.Option(PlanFormat.text, "--format", "-f", help="How to print the plan."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the plan to FILE instead of stdout."),
        error_format: ErrorFormat = typer.Option(
            ErrorFormat.full, "--error-format", help="How to print spec errors."
        ),
    ) -> None:
        """Check SPEC (YAML, templates, graph, backends, data) and print its execution plan.

        Exits 0 with the plan, or 2 with every error found, each as
        FILE:LINE:COL: error: MESSAGE with the source line and a hint.
        """
        from dlngraph.api import compile_spec
        from dlngraph.compiler.render import render

        try:
            plan = compile_spec(spec)
        except SpecError as exc:
            raise _Reported(exc, error_format.value) from None
        rendered = render(plan, fmt.value)
        if output is None:
            typer.echo(rendered, nl=False)
        else:
            try:
                output.write_text(rendered, encoding="utf-8")
            except OSError as exc:
                raise DlngraphError(f"error: cannot write {output}: {exc.strerror}") from None


class _Reported(SpecError):
    """A SpecError that renders in the format the user asked for."""

    def __init__(self, error: SpecError, fmt: str):
        self.fmt = fmt
        super().__init__(error.diagnostics)

    def render(self, fmt: str = "full") -> str:
        return super().render(self.fmt)
