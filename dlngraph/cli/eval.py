"""`dlngraph eval`: score a network on a data split and write its predictions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dlngraph.cli.options import CACHE, CHECKPOINT, FORCE, NO_CACHE


def eval_cmd(
    spec: Path = typer.Argument(..., help="Path to the spec YAML."),
    split: str = typer.Option("dev", "--split", help="train, dev or test."),
    checkpoint: Path | None = CHECKPOINT,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N examples."),
    out: Path | None = typer.Option(None, "--out", help="Write predictions here as JSONL."),
    force: bool = FORCE,
    cache: Path | None = CACHE,
    no_cache: bool = NO_CACHE,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Examples per batched call."),
) -> None:
    """Evaluate SPEC on a split: print the metric, optionally write predictions."""
    from dlngraph.api import evaluate

    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("eval", total=None)
        result = evaluate(
            spec,
            split,
            checkpoint=checkpoint,
            limit=limit,
            out=out,
            force=force,
            cache_dir=cache,
            no_cache=no_cache,
            batch_size=batch_size,
            on_batch=lambda done, total: progress.update(task, completed=done, total=total),
        )
    typer.echo(f"{result.metric} on {split}: {result.score:.4f} ({result.correct}/{result.total})")
    if len(result.per_output) > 1:
        for node, value in result.per_output.items():
            typer.echo(f"  {node}: {value:.4f}")
    hits = sum(u.cache_hits for u in result.usage.values())
    tokens = sum(u.prompt_tokens + u.completion_tokens for u in result.usage.values())
    typer.echo(f"model calls: {result.model_calls}, cache hits: {hits}, tokens computed: {tokens}")
    if out is not None:
        typer.echo(f"predictions: {out}")


def register(app: typer.Typer) -> None:
    app.command(
        "eval",
        epilog=(
            "Examples:\n\n"
            "  dlngraph eval specs/dln1-mpqa.yaml --split dev --limit 50\n\n"
            "  dlngraph eval specs/dln1-mpqa.yaml --split test --checkpoint runs/demo/best.yaml --out preds.jsonl"
        ),
    )(eval_cmd)
