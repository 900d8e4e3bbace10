"""`dlngraph cache stats|clear`: inspect or empty the response cache."""

from __future__ import annotations

from pathlib import Path

import typer

cache_app = typer.Typer(help="Inspect or clear the response cache.", no_args_is_help=True)

CACHE_DIR = typer.Option(None, "--cache", help="Cache directory (default: the user cache directory).")


@cache_app.command("stats")
def stats_cmd(cache: Path | None = CACHE_DIR) -> None:
    """Print the number of cached responses per backend, model and operation."""
    from dlngraph.runtime.cache import Cache

    stats = Cache(cache).stats()
    typer.echo(f"{stats['path']}: {stats['entries']} entries, {stats['bytes'] / 1e6:.1f} MB")
    for group in stats["groups"]:
        typer.echo(f"  {group['kind']} {group['op']:<8} {group['entries']:>8}  {group['identity']}")


@cache_app.command("clear")
def clear_cmd(cache: Path | None = CACHE_DIR) -> None:
    """Delete every cached response."""
    from dlngraph.runtime.cache import Cache

    store = Cache(cache)
    typer.echo(f"removed {store.clear()} entries from {store.path}")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
