"""`dlngraph compile`: check a spec and print its execution plan."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("compile")
    def compile_cmd(spec: str = typer.Argument(..., help="Path to the spec YAML.")) -> None:
        """Check SPEC and print its execution plan (placeholder until the compiler lands)."""
        raise NotImplementedError
