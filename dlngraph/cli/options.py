"""Options several subcommands share, defined once so their flags and help agree."""

from __future__ import annotations

import typer

CHECKPOINT = typer.Option(None, "--checkpoint", help="Learned prompts (YAML from `fit`).")
CACHE = typer.Option(None, "--cache", help="Response cache directory.")
NO_CACHE = typer.Option(False, "--no-cache", help="Use no on-disk cache: every answer comes from the model (a request repeated within the run is sent once).")
FORCE = typer.Option(False, "--force", help="Replace the output file if it exists (never the spec, its data or a non-regular file).")
