"""`dlngraph run`: run a network on a few examples and print every node's output."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from dlngraph.cli.options import CACHE, CHECKPOINT, NO_CACHE


def run_cmd(
    spec: Path = typer.Argument(..., help="Path to the spec YAML."),
    inputs: list[str] = typer.Option([], "--input", help="One example as a JSON object (repeatable)."),
    input_file: Path | None = typer.Option(None, "--input-file", help="Examples as JSONL, one per line."),
    checkpoint: Path | None = CHECKPOINT,
    cache: Path | None = CACHE,
    no_cache: bool = NO_CACHE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per example."),
) -> None:
    """Run SPEC on examples given inline or in a file; print every node's output."""
    from dlngraph.errors import RuntimeFailure
    from dlngraph.api import load_plan, run
    from dlngraph.runtime.data import parse_example, read_jsonl

    plan = load_plan(spec)
    fields = list(plan.spec.inputs)
    examples = [parse_example(text, fields, where=f"--input #{i}") for i, text in enumerate(inputs, 1)]
    if input_file is not None:
        examples += read_jsonl(input_file, fields)
    if not examples:
        raise RuntimeFailure("no examples given", hint="pass --input '{...}' or --input-file FILE")
    with Console(stderr=True).status(f"running {len(examples)} example(s)"):
        outputs = run(plan, examples, checkpoint=checkpoint, cache_dir=cache, no_cache=no_cache)
    order = plan.topological_order
    for i, (example, out) in enumerate(zip(examples, outputs), start=1):
        if as_json:
            typer.echo(json.dumps({"input": example, "outputs": {n: out[n] for n in order}}, sort_keys=True))
            continue
        typer.echo(f"example {i}")
        for name in order:
            typer.echo(f"  {name}: " + out[name].replace("\n", "\n    "))


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        epilog=(
            "Examples:\n\n"
            "  dlngraph run specs/dln1-mpqa.yaml --input '{\"input\": \"a gripping, funny film\"}'\n\n"
            "  dlngraph run spec.yaml --input-file examples.jsonl --checkpoint runs/demo/best.yaml --json"
        ),
    )(run_cmd)
