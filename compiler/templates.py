"""Jinja templates as the compiler sees them: parsed in a sandbox, variables found.

Templates are parsed in the one bounded sandbox (`dlngraph.sandbox.ENV`) that
also renders them. Attribute access the sandbox would refuse at run time
(`{{ ''.__class__ }}`) is a syntax error here, at compile time, and a template
that exceeds a render bound with one-character placeholder values (it would
with any data) is a `RenderLimit`. Parsing is
cached by template text, so a spec whose nodes share a template
(or a large generated spec) parses each distinct text once. Positions of
problems are mapped back to the spec file here, because where a template line
sits depends on how it was written in YAML (plain, quoted or block scalar).
"""

from __future__ import annotations

import re
from functools import lru_cache

import jinja2
from jinja2 import meta

from dlngraph.errors import Span
from dlngraph.sandbox import ENV, trial, unsafe_attribute
from dlngraph.yamlsource import PathKey, Source


# Most templates are text plus `{{ name }}` tags. For those the variables can be
# read with one regex, which is ~50x cheaper than a jinja parse (and matters for
# specs of tens of thousands of nodes). Anything else (blocks, comments,
# filters, whitespace control, a stray `{{`, jinja's own words) takes the
# full sandboxed parse. tests/test_fuzz.py checks both paths agree.
_TEXT = r"(?:[^{]|\{(?![{%#]))*"
_SIMPLE = re.compile(rf"{_TEXT}(?:\{{\{{[ \t]*[A-Za-z_][A-Za-z0-9_]*[ \t]*\}}\}}{_TEXT})*")
_TAG = re.compile(r"\{\{[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\}\}")
_JINJA_WORDS = frozenset(
    "and or not in is if else elif for true false none True False None loop self caller varargs kwargs".split()
)


class RenderLimit(jinja2.TemplateSyntaxError):
    """Rendered with placeholder values, the template already exceeds a bound of the sandbox."""


@lru_cache(maxsize=1 << 16)
def variables(text: str) -> frozenset[str]:
    """The undeclared variables of a template; raises `jinja2.TemplateSyntaxError`
    (an `UnsafeAttribute` for attribute access the sandbox refuses, a
    `RenderLimit` for a template that exceeds a render bound)."""
    if _SIMPLE.fullmatch(text):
        found = frozenset(_TAG.findall(text))
        if not found & _JINJA_WORDS:
            return found
    return parsed_variables(text)


def parsed_variables(text: str) -> frozenset[str]:
    """`variables` by a full parse in the sandbox, without the fast path."""
    ast = ENV.parse(text)
    unsafe = unsafe_attribute(ast)
    if unsafe is not None:
        raise unsafe
    found = frozenset(meta.find_undeclared_variables(ast))
    exceeded = trial(text, found)
    if exceeded is not None:
        raise RenderLimit(f"rendered with one-character values, {exceeded}", 1)
    return found


def error_span(source: Source, path: PathKey, template_line: int) -> Span:
    """Where line `template_line` (1-based) of the template at `path` sits in the file."""
    located = source.nearest(path)
    value = located.value
    block = located.style in ("|", ">")
    line = value.line + template_line - (0 if block else 1)
    line = min(line, value.end_line or line)
    if line == value.line and not block:
        return Span(value.line, value.col)
    text = source.line(line) or ""
    return Span(line, len(text) - len(text.lstrip()) + 1)


def variable_span(source: Source, path: PathKey, name: str) -> Span:
    """The first place `name` is written inside the template at `path` (else the value)."""
    value = source.value_span(path)
    pattern = re.compile(rf"\{{[{{%][^}}]*?\b({re.escape(name)})\b")
    for line in range(value.line, (value.end_line or value.line) + 1):
        text = source.line(line) or ""
        start = value.col - 1 if line == value.line else 0
        found = pattern.search(text, start)
        if found:
            return Span(line, found.start(1) + 1, line, found.end(1) + 1)
    return value
