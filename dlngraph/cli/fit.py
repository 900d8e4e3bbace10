"""`dlngraph fit`: train a network's prompts and write a run directory."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dlngraph.cli.options import CACHE, NO_CACHE

log = logging.getLogger(__name__)


class _Bars:
    """Progress bars: one over iterations, one over the batched calls of the current one."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.iterations = progress.add_task("iterations", total=None)
        self.calls = progress.add_task("calls", total=None)
        self.made = 0

    def iteration(self, done: int, total: int) -> None:
        self.progress.update(self.iterations, completed=done, total=total)
        self.made = 0

    def call(self, purpose: str, requests: int) -> None:
        self.made += 1
        self.progress.update(self.calls, completed=self.made, description=f"{purpose} ({requests} requests)")


def _cost(plan, estimate) -> str:  # noqa: ANN001 - ExecutionPlan, Estimate
    """The cost of `estimate` when every backend is one priced litellm model, else why not."""
    models = {getattr(plan.spec.backends[n.backend], "model", None) for n in plan.nodes.values()}
    kinds = {n.backend_kind for n in plan.nodes.values()}
    if kinds != {"litellm"} or len(models) != 1:
        return "cost: not priced (local or mixed backends)"
    from dlngraph.runtime.backends.litellm_backend import import_litellm

    try:
        prompt, completion = import_litellm().cost_per_token(
            model=models.pop(), prompt_tokens=estimate.prompt_tokens, completion_tokens=estimate.completion_tokens
        )
    except Exception:  # a model missing from litellm's price map
        return "cost: unknown for this model"
    return f"cost: ~${prompt + completion:.4f}"


def fit_cmd(
    spec: Path = typer.Argument(..., help="Path to the spec YAML."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<name>-<time>)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this directory."),
    seed: int | None = typer.Option(None, "--seed", help="Override train.seed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the projected cost and stop."),
    iterations: int | None = typer.Option(None, "--iterations", min=0, help="Override train.iterations."),
    cache: Path | None = CACHE,
    no_cache: bool = NO_CACHE,
    mlflow: bool = typer.Option(
        False, "--mlflow",
        help="Log to MLflow (needs dlngraph[mlflow]); the store is the spec's tracking.mlflow or MLFLOW_TRACKING_URI.",
    ),
) -> None:
    """Train the prompts of SPEC; prints the projected calls and tokens before the first call."""
    from dlngraph.api import compile_spec
    from dlngraph.runtime.fit import Fit

    plan = compile_spec(spec)
    per, whole = plan.estimate_per_iteration, plan.estimate(iterations)
    typer.echo(
        f"{plan.name}: per iteration ~{per.calls} batched calls, {per.requests} requests, "
        f"{per.prompt_tokens + per.completion_tokens} tokens"
    )
    typer.echo(
        f"whole fit: ~{whole.calls} calls, {whole.requests} requests, "
        f"{whole.prompt_tokens} prompt + {whole.completion_tokens} completion tokens; {_cost(plan, whole)}"
    )
    if dry_run:
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        options = dict(seed=seed, iterations=iterations, cache_dir=cache, no_cache=no_cache, mlflow=mlflow,
                       events=_Bars(progress))
        fit = Fit.resume(resume, plan, **options) if resume is not None else Fit.start(plan, out, **options)
        try:
            result = fit.run()
        except KeyboardInterrupt:
            progress.stop()
            typer.echo(f"interrupted; the last checkpoint is saved. Continue with: "
                       f"dlngraph fit {spec} --resume {fit.run_dir.path}", err=True)
            raise typer.Exit(130) from None
    best = result.best
    dev = "n/a" if best["dev_acc"] is None else f"{best['dev_acc']:.4f}"
    typer.echo(f"done: {result.iterations} iteration(s){' (early stop)' if result.stopped_early else ''}; "
               f"best dev accuracy {dev} at iteration {best['iteration']}")
    typer.echo(f"run directory: {result.run_dir.path}")
    typer.echo(f"best prompts: {result.run_dir.best}")


def register(app: typer.Typer) -> None:
    app.command(
        "fit",
        epilog=(
            "Examples:\n\n"
            "  dlngraph fit specs/dln1-mpqa.yaml --dry-run\n\n"
            "  dlngraph fit specs/dln2-subj.yaml --out runs/subj --seed 1 --iterations 2\n\n"
            "  dlngraph fit specs/dln2-subj.yaml --resume runs/subj\n\n"
            "  MLFLOW_TRACKING_URI=sqlite:///mlflow.db dlngraph fit specs/dln1-mpqa.yaml --mlflow"
        ),
    )(fit_cmd)
