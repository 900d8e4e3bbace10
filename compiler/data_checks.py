"""Pass 6, data checks: the JSONL files exist and hold the fields the spec reads.

REQUIRES "validated". GUARANTEES "data_checked": `unit.profiles` maps each
split named under `data:` to its absolute path, row count and mean field
lengths (chars, from the first `SAMPLE_ROWS` rows), which the schedule turns
into token estimates. A missing field is reported at the place in the spec
that names it (the input, the output's target, the node's `label_field`).

Everything the runtime would trip over is found here, before any model call:
a path that is a directory or a device, a file over `MAX_DATA_BYTES`, bytes
that are not UTF-8, a line that is not a JSON object. Such errors name the file,
line and column but never echo the line: a data path may point at a file that
is not data at all (`test: /etc/shadow`), whose text must not be printed.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

from dlngraph.codes import name_of
from dlngraph.errors import Diagnostic, SpecError, Span
from dlngraph.spec import DeepThinkingNode, Spec
from dlngraph.yamlsource import PathKey, Source, file_kind

from dlngraph.compiler.ir import FieldProfile, Unit

REQUIRES = frozenset({"validated"})
GUARANTEES = frozenset({"data_checked"})

SAMPLE_ROWS = 200
MAX_DATA_BYTES = 256 << 20  # DLN datasets are a few MB; the runtime holds a whole split in memory


def file_problem(path: Path) -> tuple[str, str] | None:
    """(code, why) if `path` cannot be a data file: missing, not a regular file, too large, unreadable."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "E501", "not found"
    except OSError as exc:
        return "E504", f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "E504", f"is {file_kind(info.st_mode)}, not a file"
    if info.st_size > MAX_DATA_BYTES:
        return "E506", f"is {info.st_size:,} bytes, more than the limit of {MAX_DATA_BYTES:,}"
    if not os.access(path, os.R_OK):
        return "E504", "cannot be read (permission denied)"
    return None


def run(unit: Unit) -> Unit:
    assert unit.spec is not None and unit.source is not None
    spec, source = unit.spec, unit.source
    base = unit.path.resolve().parent
    profiles: dict[str, FieldProfile] = {}
    problems: list[Diagnostic] = []
    for split, relative in spec.data.paths().items():
        path = (base / relative).resolve()
        problem = file_problem(path)
        if problem is not None:
            code, why = problem
            problems.append(
                source.diagnostic(
                    code,
                    f"data file for split '{split}' {why}: {path}",
                    source.value_span(("data", split)),
                    hint=_FILE_HINTS[code].format(base=base),
                )
            )
            continue
        profile = _profile(path)
        if isinstance(profile, Diagnostic):
            problems.append(profile)
            continue
        problems += _missing_fields(spec, source, split, profile, path)
        profiles[split] = profile
    if problems:
        raise SpecError(problems)
    return replace(unit, profiles=profiles)


_FILE_HINTS = {
    "E501": "paths under `data:` are relative to the spec's directory ({base})",
    "E504": "name a JSONL file (one JSON object per line) under `data:`",
    "E506": "split the data, or sample the examples to train and evaluate on",
}


def _profile(path: Path) -> FieldProfile | Diagnostic:
    """The split's profile, read in one streaming pass, or the diagnostic of its first bad line."""
    rows = 0
    sampled: list[tuple[int, dict]] = []  # (line number, row) of the first SAMPLE_ROWS rows
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    col = len(raw[: exc.start].decode("utf-8", "replace")) + 1
                    return _invalid(path, number, col, f"byte 0x{raw[exc.start]:02x} does not decode", "E505")
                if not line.strip():
                    continue
                rows += 1
                if len(sampled) < SAMPLE_ROWS:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        return _invalid(path, number, exc.colno, f"not JSON: {exc.msg}")
                    if not isinstance(row, dict):
                        return _invalid(path, number, 1, "a line must be a JSON object")
                    sampled.append((number, row))
    except OSError as exc:
        return _invalid(path, 1, 1, f"cannot be read ({exc.strerror})", "E504")
    if not rows:
        return _invalid(path, 1, 1, "the file has no rows")
    totals: dict[str, int] = {}
    counts: dict[str, int] = {}
    for _, row in sampled:
        for key, value in row.items():
            totals[key] = totals.get(key, 0) + len(str(value))
            counts[key] = counts.get(key, 0) + 1
    means = {k: totals[k] / counts[k] for k in sorted(totals)}
    everywhere = tuple(k for k in sorted(counts) if counts[k] == len(sampled))
    first_without = {
        k: next(number for number, row in sampled if k not in row) for k in sorted(counts) if k not in everywhere
    }
    return FieldProfile(path=path, rows=rows, mean_chars=means, fields=everywhere, first_without=first_without)


def _invalid(path: Path, line: int, col: int, why: str, code: str = "E503") -> Diagnostic:
    # No source line: the file may be anything (a key, a password file), and its
    # text must not reach a terminal or a log.
    what = {"E503": "data file is not JSONL of objects", "E504": "data file", "E505": "data file is not UTF-8"}[code]
    return Diagnostic(
        code=code,
        name=name_of(code),
        message=f"{what}: {why}",
        file=str(path),
        span=Span(line, max(1, col)),
        hint=_LINE_HINTS[code],
    )


_LINE_HINTS = {
    "E503": "each line must be one JSON object, e.g. {\"input\": \"...\", \"target\": \"...\"}; "
    "the line is not shown, as the file may not be data",
    "E504": "check the file's permissions",
    "E505": "save the file as UTF-8 (JSON text is UTF-8); the line is not shown, as the file may not be data",
}


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
