"""`dlngraph compile`: check a spec and print its execution plan.

Offline unless `--probe`: compiling reads the spec, its data files and, for a
litellm backend that names a `tokenizer`, that local tokenizer; it sends no
request. `--probe` asks each litellm endpoint the spec points at what it
supports, all endpoints within one `--probe-timeout`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from dlngraph.cli.options import FORCE
from dlngraph.errors import SpecError

EPILOG = """Examples:

  dlngraph compile specs/dln2-subj.yaml

  dlngraph compile specs/wide-dag.yaml --format dot -o plan.dot

  dlngraph compile my-spec.yaml --error-format concise

  dlngraph compile my-vllm-spec.yaml --probe --probe-timeout 10
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


def compile_cmd(
    spec: Path = typer.Argument(..., help="Path to the spec YAML."),
    fmt: PlanFormat = typer.Option(PlanFormat.text, "--format", "-f", help="How to print the plan."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the plan to FILE instead of stdout."),
    force: bool = FORCE,
    error_format: ErrorFormat = typer.Option(ErrorFormat.full, "--error-format", help="How to print spec errors."),
    probe: bool = typer.Option(
        False, "--probe", help="Ask the spec's litellm endpoints what they support (the only network use of compile)."
    ),
    probe_timeout: float = typer.Option(
        20.0, "--probe-timeout", min=0.1, help="Seconds for all of --probe's requests together."
    ),
) -> None:
    """Check SPEC (YAML, templates, graph, backends, data) and print its execution plan.

    Exits 0 with the plan, or 2 with every error found, each as
    FILE:LINE:COL: error: MESSAGE with the source line and a hint.
    """
    from dlngraph.api import compile_spec, input_files
    from dlngraph.compiler.render import render
    from dlngraph.runtime.files import check_output, write_atomic

    try:
        plan = compile_spec(spec, probe_timeout=probe_timeout if probe else None)
    except SpecError as exc:
        raise _Reported(exc, error_format.value) from None
    rendered = render(plan, fmt.value)
    if output is None:
        typer.echo(rendered, nl=False)
    else:
        write_atomic(check_output(output, protected=input_files(plan, None), force=force), rendered)


class _Reported(SpecError):
    """A SpecError that renders in the format the user asked for."""

    def __init__(self, error: SpecError, fmt: str):
        self.fmt = fmt
        super().__init__(error.diagnostics, omitted=error.omitted)

    def render(self, fmt: str = "full") -> str:
        return super().render(self.fmt)


def register(app: typer.Typer) -> None:
    app.command("compile", epilog=EPILOG)(compile_cmd)
