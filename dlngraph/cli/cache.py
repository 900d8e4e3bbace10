"""`dlngraph cache stats|clear`: inspect or empty the response cache.

Both work on a damaged cache file: `stats` names it and says how to fix it,
`clear` removes it.
"""

from __future__ import annotations

from pathlib import Path

import typer

cache_app = typer.Typer(help="Inspect or clear the response cache.", no_args_is_help=True)

CACHE_DIR = typer.Option(None, "--cache", help="Cache directory (default: the user cache directory).")


def stats_cmd(cache: Path | None = CACHE_DIR) -> None:
    """Print the number of cached responses per backend, model and operation."""
    from dlngraph.runtime.cache import Cache

    stats = Cache(cache).stats()
    typer.echo(f"{stats['path']}: {stats['entries']} entries, {stats['bytes'] / 1e6:.1f} MB")
    for group in stats["groups"]:
        typer.echo(f"  {group['kind']} {group['op']:<8} {group['entries']:>8}  {group['identity']}")


def clear_cmd(cache: Path | None = CACHE_DIR) -> None:
    """Delete every cached response (a damaged cache file is removed)."""
    from dlngraph.runtime.cache import Cache

    store = Cache(cache)
    damage = store.damage()
    removed = store.clear()
    typer.echo(f"removed damaged cache file {store.path} ({damage})" if damage else f"removed {removed} entries from {store.path}")


def register(app: typer.Typer) -> None:
    cache_app.command("stats")(stats_cmd)
    cache_app.command("clear")(clear_cmd)
    app.add_typer(cache_app, name="cache")
