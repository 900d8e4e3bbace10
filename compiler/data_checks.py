"""Pass 6, data checks: the JSONL files exist and hold the fields the spec reads.

REQUIRES "validated". GUARANTEES "data_checked": `unit.profiles` maps each
split named under `data:` to its absolute path, row count and mean field
lengths (chars, from the first `SAMPLE_ROWS` rows), which the schedule turns
into token estimates. A missing field is reported at the place in the spec
that names it (the input, the output's target, the node's `label_field`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dlngraph.codes import name_of
from dlngraph.errors import Diagnostic, SpecError, Span
from dlngraph.spec import DeepThinkingNode, Spec
from dlngraph.yamlsource import PathKey, Source

from dlngraph.compiler.ir import FieldProfile, Unit

REQUIRES = frozenset({"validated"})
GUARANTEES = frozenset({"data_checked"})

SAMPLE_ROWS = 200


def run(unit: Unit) -> Unit:
    assert unit.spec is not None and unit.source is not None
    spec, source = unit.spec, unit.source
    base = unit.path.resolve().parent
    profiles: dict[str, FieldProfile] = {}
    problems: list[Diagnostic] = []
    for split, relative in spec.data.paths().items():
        path = (base / relative).resolve()
        if not path.is_file():
            problems.append(
                source.diagnostic(
                    "E501",
                    f"data file for split '{split}' not found: {path}",
                    source.value_span(("data", split)),
                    hint=f"paths under `data:` are relative to the spec's directory ({base})",
                )
            )
            continue
        profile, bad_line = _profile(path)
        if bad_line is not None:
            problems.append(_invalid(path, *bad_line))
            continue
        problems += _missing_fields(spec, source, split, profile, path)
        profiles[split] = profile
    if problems:
        raise SpecError(problems)
    return replace(unit, profiles=profiles)


def _profile(path: Path) -> tuple[FieldProfile, tuple[int, str, str] | None]:
    """The split's profile, or (line number, line, why) of its first bad line."""
    raw = path.read_bytes()
    lines = raw.decode("utf-8", errors="replace").splitlines()
    rows = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    totals: dict[str, int] = {}
    counts: dict[str, int] = {}
    sampled: list[dict] = []
    for number, line in rows[:SAMPLE_ROWS]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return _empty(path), (number, line, f"not JSON: {exc.msg} at column {exc.colno}")
        if not isinstance(row, dict):
            return _empty(path), (number, line, "a line must be a JSON object")
        sampled.append(row)
        for key, value in row.items():
            totals[key] = totals.get(key, 0) + len(str(value))
            counts[key] = counts.get(key, 0) + 1
    if not rows:
        return _empty(path), (1, "", "the file has no rows")
    means = {k: totals[k] / counts[k] for k in sorted(totals)}
    everywhere = tuple(k for k in sorted(counts) if counts[k] == len(sampled))
    first_without = {
        k: next(number for (number, _), row in zip(rows, sampled) if k not in row)
        for k in sorted(counts) if k not in everywhere
    }
    return FieldProfile(path=path, rows=len(rows), mean_chars=means, fields=everywhere, first_without=first_without), None


def _empty(path: Path) -> FieldProfile:
    return FieldProfile(path=path, rows=0, mean_chars={}, fields=())


def _invalid(path: Path, line: int, text: str, why: str) -> Diagnostic:
    return Diagnostic(
        code="E503",
        name=name_of("E503"),
        message=f"data file is not JSONL of objects: {why}",
        file=str(path),
        span=Span(line, 1),
        hint="each line must be one JSON object, e.g. {\"input\": \"...\", \"target\": \"...\"}",
        source_line=text[:200],
    )


def _missing_fields(spec: Spec, source: Source, split: str, profile: FieldProfile, path: Path) -> list[Diagnostic]:
    wanted: list[tuple[str, PathKey, str | None]] = [
        (field, ("inputs", i), None) for i, field in enumerate(spec.inputs)
    ]
    wanted += [(target, ("outputs", node), node) for node, target in spec.outputs.items()]
    for name, node in spec.nodes.items():
        if isinstance(node, DeepThinkingNode) and node.demonstrations.examples is None and node.demonstrations.split == split:
            wanted.append((node.label_field, ("nodes", name, "label_field"), name))
    out = []
    reported: set[str] = set()
    for field, spec_path, node in wanted:
        if field in profile.fields or field in reported:
            continue
        reported.add(field)
        span = source.value_span(spec_path) if spec_path in source.spans else source.key_span(spec_path[:2])
        out.append(
            source.diagnostic(
                "E502",
                (f"field '{field}' is missing from line {profile.first_without[field]} of the {split} data ({path.name})"
                 if field in profile.first_without else f"field '{field}' is in no row of the {split} data ({path.name})"),
                span,
                node=node,
                hint=f"fields in every row of {path.name}: {', '.join(profile.fields) or 'none'}",
            )
        )
    return out
