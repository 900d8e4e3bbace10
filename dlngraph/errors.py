"""User-facing errors: diagnostics that point at the user's own text.

A `SpecError` carries one or more `Diagnostic`s. Each has a stable code
(``E101``) and kebab name (``unknown-key``), a message, a span in the spec
file, the node it concerns and a hint. Rendering follows Ruff: the first line
is ``FILE:LINE:COL: error: MESSAGE``, then the source line with a caret, then
``help: HINT``. This module imports nothing of the project.

Output is bounded whatever the input: a headline keeps at most
`MAX_MESSAGE_CHARS` of its message, an echoed source line is cut to a window of
`SOURCE_WINDOW` characters around the caret, and the full and concise formats
print the first `MAX_SHOWN` diagnostics and a count of the rest (a one-line
spec with thousands of mistakes printed 883 MB before these bounds).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MAX_SHOWN = 20  # diagnostics printed in full or concise form; the rest are counted
MAX_COLLECTED = 1_000  # diagnostics a pass builds; past that it only counts them (`SpecError.omitted`)
MAX_MESSAGE_CHARS = 400  # of a message, which may quote a key or value of any length
SOURCE_WINDOW = 120  # characters of an echoed source line, around the caret


@dataclass(frozen=True, order=True)
class Span:
    """1-based line and column of a region in a file (end exclusive)."""

    line: int = 1
    col: int = 1
    end_line: int | None = None
    end_col: int | None = None


@dataclass(frozen=True)
class Diagnostic:
    code: str
    name: str
    message: str
    file: str = "<spec>"
    span: Span = field(default_factory=Span)
    node: str | None = None
    hint: str | None = None
    source_line: str | None = None

    @property
    def headline(self) -> str:
        where = f"node '{_clip(self.node, 80)}': " if self.node else ""
        return _one_line(f"{self.file}:{self.span.line}:{self.span.col}: error: {where}{_clip(self.message)}")

    def render(self) -> str:
        lines = [self.headline]
        if self.source_line is not None:
            gutter = str(self.span.line)
            pad = " " * len(gutter)
            width = 1
            if self.span.end_line == self.span.line and self.span.end_col:
                width = max(1, self.span.end_col - self.span.col)
            text, col = _window(self.source_line.rstrip("\n"), self.span.col)
            width = max(1, min(width, len(text) - col + 1))
            lines.append(f"{pad} |")
            lines.append(f"{gutter} | {text}")
            lines.append(f"{pad} | {' ' * (col - 1)}{'^' * width} {self.name}")
        hint = _one_line(_clip(self.hint)) if self.hint else f"see `dlngraph explain {self.code}`"
        lines.append(f"  = help: {hint}")
        lines.append(f"  = code: {self.code} ({self.name})")
        return "\n".join(lines)

    def concise(self) -> str:
        return f"{self.headline} [{self.code}]"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source_line")
        d["message"] = _clip(self.message)
        return d


# Control characters and line separators (from a key or value in the user's
# file) are escaped so a headline stays one line.
_CONTROL = (
    {c: f"\\x{c:02x}" for c in [*range(32), *range(0x7F, 0xA0)]}
    | {0x2028: "\\u2028", 0x2029: "\\u2029"}
    | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
)


def _one_line(text: str) -> str:
    return text.translate(_CONTROL)


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _window(text: str, col: int) -> tuple[str, int]:
    """At most SOURCE_WINDOW characters of `text` around 1-based `col`, and the caret's column in them."""
    if len(text) <= SOURCE_WINDOW:
        return text, col
    start = min(max(0, col - 1 - SOURCE_WINDOW // 3), len(text) - SOURCE_WINDOW)
    head = "..." if start > 0 else ""
    tail = "..." if start + SOURCE_WINDOW < len(text) else ""
    return f"{head}{text[start : start + SOURCE_WINDOW]}{tail}", col - start + len(head)


class DlngraphError(Exception):
    """Base of every error dlngraph reports to a user without a traceback."""

    exit_code = 1

    def render(self) -> str:
        return str(self)


class SpecError(DlngraphError):
    """The spec is wrong; holds the diagnostics found, sorted by position.

    A pass that finds more than MAX_COLLECTED mistakes builds diagnostics for
    the first ones only and counts the rest in `omitted`.
    """

    exit_code = 2

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic, *, omitted: int = 0):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = sorted(
            diagnostics, key=lambda d: (d.file, d.span.line, d.span.col, d.code, d.message)
        )
        self.omitted = omitted
        super().__init__(self.render())

    def render(self, fmt: str = "full") -> str:
        """The diagnostics as JSON (each of bounded size), or the first MAX_SHOWN as text."""
        if fmt == "json":
            return json.dumps([d.to_dict() for d in self.diagnostics], indent=2, sort_keys=True)
        shown = self.diagnostics[:MAX_SHOWN]
        gap = "\n" if fmt == "concise" else "\n\n"
        text = gap.join(d.concise() if fmt == "concise" else d.render() for d in shown)
        rest = len(self.diagnostics) - len(shown) + self.omitted
        if rest:
            text += f"{gap}... and {rest:,} more error{'s' * (rest > 1)} not shown; fix these and compile again"
        return text


class RuntimeFailure(DlngraphError):
    """A model call, data file or backend failed at run time; names what failed."""

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None):
        self.node = node
        self.hint = hint
        where = f"node '{node}': " if node else ""
        text = f"error: {where}{message}"
        if hint:
            text += f"\n  = help: {hint}"
        super().__init__(text)
