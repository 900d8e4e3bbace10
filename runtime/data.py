"""Reading dataset splits: JSONL, one example per line.

A line that is not a JSON object, or lacks a field the spec reads, is an
error naming the file and line, raised before any model call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dlngraph.errors import RuntimeFailure

Example = dict[str, str]


def read_jsonl(path: Path, fields: Sequence[str], *, limit: int | None = None) -> list[Example]:
    """Examples of `path` (blank lines skipped), values as strings, at most `limit`."""
    if not path.is_file():
        raise RuntimeFailure(f"data file {path} does not exist", hint="data paths are relative to the spec file")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(parse_example(line, fields, where=f"{path}:{lineno}"))
    return examples


def parse_example(text: str, fields: Sequence[str], *, where: str) -> Example:
    """One JSON object holding every field in `fields`; `where` names it in errors."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RuntimeFailure(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(value, dict):
        raise RuntimeFailure(f"{where}: expected a JSON object, got {type(value).__name__}")
    missing = [f for f in fields if f not in value]
    if missing:
        raise RuntimeFailure(
            f"{where}: missing field {', '.join(repr(f) for f in missing)}",
            hint=f"every example needs the fields the spec reads: {', '.join(fields)}",
        )
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
