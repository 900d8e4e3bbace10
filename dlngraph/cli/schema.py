"""`dlngraph schema`: print the JSON Schema of the spec format."""

from __future__ import annotations

import json

import typer

EPILOG = """Examples:

  dlngraph schema > dlngraph-spec.schema.json
"""


def schema_cmd() -> None:
    """Print the JSON Schema of a spec file (editors can validate and complete with it)."""
    from dlngraph.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("schema", epilog=EPILOG)(schema_cmd)
