"""Reading dataset splits: JSONL, one example per line.

A line that is not a JSON object, is not UTF-8, or lacks a field the spec
reads, is an error naming the file and line, raised before any model call; the
line's text is never shown (the path may name a file that is not data). The
file checks are the compiler's (`file_problem`), so `compile` and `eval` agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dlngraph.compiler.data_checks import file_problem
from dlngraph.errors import RuntimeFailure

if TYPE_CHECKING:
    from dlngraph.compiler.plan import ExecutionPlan

Example = dict[str, str]


def read_split(plan: ExecutionPlan, split: str, *, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of the spec's `data.<split>` (none when it names no such
    file), each holding the input fields and the outputs' target fields."""
    path = plan.data_paths.get(split)
    if path is None:
        return []
    return read_jsonl(Path(path), [*plan.spec.inputs, *sorted(set(plan.spec.outputs.values()))], limit=limit)


def read_jsonl(path: Path, fields: Sequence[str], *, limit: int | None = None) -> list[Example]:
    """Examples of `path` (blank lines skipped), values as strings, at most `limit`."""
    problem = file_problem(path)
    if problem is not None:
        raise RuntimeFailure(f"data file {path} {problem[1]}", hint="data paths are relative to the spec file")
    examples: list[Example] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RuntimeFailure(
                    f"{path}:{lineno}: byte 0x{raw[exc.start]:02x} is not UTF-8", hint="save the file as UTF-8"
                ) from None
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
