"""Pass 7, meta-prompts: the trainer's built-in templates parse and read only what they may.

REQUIRES "parsed". GUARANTEES "meta_prompts_checked". The trainer renders
meta-prompts (prompt proposals, posterior sampling) from `dlngraph.prompts`,
which exposes `TEMPLATES` (file name -> the variables it may use) and
`load(name)`. A broken one must fail `compile`, before any model call, not
halfway through `fit`. If the package is absent, there is nothing to check.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import jinja2

from dlngraph.codes import name_of
from dlngraph.errors import Diagnostic, SpecError, Span

from dlngraph.compiler import templates
from dlngraph.compiler.ir import Unit

REQUIRES = frozenset({"parsed"})
GUARANTEES = frozenset({"meta_prompts_checked"})

PROMPTS_MODULE = "dlngraph.prompts"


def run(unit: Unit) -> Unit:
    prompts = _prompts()
    if prompts is not None:
        problems = [p for name in sorted(prompts.TEMPLATES) if (p := _check(prompts, name)) is not None]
        if problems:
            raise SpecError(problems)
    return replace(unit, meta_prompts_checked=True)


def _prompts() -> ModuleType | None:
    try:
        return importlib.import_module(PROMPTS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == PROMPTS_MODULE:
            return None
        raise


def _check(prompts: ModuleType, name: str) -> Diagnostic | None:
    allowed = frozenset(prompts.TEMPLATES[name])
    file = str(Path(prompts.__file__).parent / name)
    text = prompts.load(name)
    try:
        found = templates.variables(text)
    except jinja2.TemplateSyntaxError as exc:
        return _diagnostic(file, text, exc.lineno or 1, f"built-in meta-prompt '{name}' does not parse: {exc.message}")
    extra = sorted(found - allowed)
    if not extra:
        return None
    line = next((i for i, t in enumerate(text.splitlines(), 1) if extra[0] in t), 1)
    return _diagnostic(
        file,
        text,
        line,
        f"built-in meta-prompt '{name}' uses undeclared variable(s) {', '.join(extra)} "
        f"(it may use: {', '.join(sorted(allowed))})",
    )


def _diagnostic(file: str, text: str, line: int, message: str) -> Diagnostic:
    lines = text.splitlines()
    return Diagnostic(
        code="E601",
        name=name_of("E601"),
        message=message,
        file=file,
        span=Span(line, 1),
        hint="this is a dlngraph bug or a local edit of dlngraph/prompts/; restore the template",
        source_line=lines[line - 1] if 0 < line <= len(lines) else None,
    )
