"""Loading a spec's YAML once, keeping where every key and value sits.

`load_source(path)` composes the file with PyYAML (libyaml when present) and
returns a `Source`: the plain data plus a map from a path of keys/indices
(``("nodes", "answer", "template")``) to the spans of that key and its value,
so later passes can point errors at the user's own text. File-level mistakes
(too big, not a file, not UTF-8, empty, YAML syntax, duplicate keys, a top
level that is not a mapping) are `SpecError`s here. This module imports only
dlngraph.errors and dlngraph.codes.

Every input is bounded before it can cost much: the size is checked before the
file is read, and one streaming pass over the parser's events (before any node
is composed) bounds nesting depth and the number of values and characters the
document holds once its aliases are expanded. Shared (aliased) nodes are
built once here, but every later consumer (validation, error messages, the
plan) sees the expanded value, so a nine-level alias bomb of 900 bytes would
otherwise cost gigabytes downstream.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlngraph.codes import name_of
from dlngraph.errors import Diagnostic, SpecError, Span

MAX_SPEC_BYTES = 16 * 1024 * 1024  # large enough for a 50,000-node generated spec
MAX_DEPTH = 64  # a real spec nests about 6 levels
# Values (scalars, lists, mappings) after alias expansion: a 50,000-node
# generated spec (benchmarks/compile_scale.py) holds about 500,000.
MAX_VALUES = 1_000_000
# Characters of all scalars after alias expansion. Without aliases a spec holds
# fewer than MAX_SPEC_BYTES; aliases may repeat a shared template, not explode.
MAX_EXPANDED_CHARS = 4 * MAX_SPEC_BYTES

PathKey = tuple[str | int, ...]


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml when present) with YAML 1.2 booleans.

    Only true/false are booleans: YAML 1.1 also reads yes/no/on/off as
    booleans, which would silently turn `choices: [no, yes]` into [False, True].
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass(frozen=True)
class Located:
    """Where one mapping entry or list item sits: its key (if any) and its value."""

    key: Span | None
    value: Span
    style: str | None = None  # scalar style of the value: None (plain), "'", '"', "|", ">"


@dataclass
class Source:
    path: Path
    text: str
    data: Any
    # path -> (key node or None, value node); spans are made from the nodes' marks on demand
    spans: dict[PathKey, tuple[yaml.Node | None, yaml.Node]] = field(default_factory=dict)
    _lines: list[str] | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    def line(self, number: int) -> str | None:
        """The 1-based source line, or None past the end."""
        if self._lines is None:
            self._lines = self.text.splitlines()
        return self._lines[number - 1] if 0 < number <= len(self._lines) else None

    def diagnostic(
        self, code: str, message: str, span: Span, *, node: str | None = None, hint: str | None = None
    ) -> Diagnostic:
        return Diagnostic(
            code=code,
            name=name_of(code),
            message=message,
            file=self.name,
            span=span,
            node=node,
            hint=hint,
            source_line=self.line(span.line),
        )

    def key_span(self, path: PathKey) -> Span:
        """The span of the key at `path`; for a list item or the root, its value."""
        located = self.nearest(path)
        return located.key or located.value

    def value_span(self, path: PathKey) -> Span:
        return self.nearest(path).value

    def nearest(self, path: PathKey) -> Located:
        """The located entry of `path`, or of its longest prefix that exists."""
        for cut in range(len(path), -1, -1):
            found = self.spans.get(path[:cut])
            if found is not None:
                key, value = found
                return Located(key and _span(key), _span(value), _style(value))
        return Located(None, Span(1, 1))


def load_source(path: str | Path) -> Source:
    """Read and compose `path`; file-level problems raise `SpecError`.

    The size is checked before reading, and at most MAX_SPEC_BYTES + 1 bytes
    are read, so `/dev/zero` or a growing file cannot exhaust memory. Only
    regular files and pipes (`<(generate-spec)`) are read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
                raise _file_error(
                    path, "E007", f"the spec path is {file_kind(info.st_mode)}, not a file: {path}",
                    "give the path of a YAML spec file",
                )  # fmt: skip
            if info.st_size > MAX_SPEC_BYTES:
                raise _too_large(path, info.st_size)
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise _file_error(path, "E007", f"spec file not found: {path}", "check the path") from None
    except IsADirectoryError:
        raise _file_error(
            path, "E007", f"the spec path is a directory, not a file: {path}", "give the path of a YAML spec file"
        ) from None
    except OSError as exc:
        raise _file_error(path, "E007", f"cannot read the spec file: {exc.strerror}", None) from None
    return parse_source(raw, path)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a directory", "a device", ..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _too_large(path: Path, size: int) -> SpecError:
    return _file_error(
        path,
        "E003",
        f"spec file is {size:,} bytes, more than the limit of {MAX_SPEC_BYTES:,}",
        "a spec describes a graph; put data in JSONL files named under `data:`",
    )


def parse_source(raw: bytes, path: Path) -> Source:
    """Compose `raw` (the bytes of the file at `path`) into a `Source`."""
    if len(raw) > MAX_SPEC_BYTES:
        raise _too_large(path, len(raw))
    text = _decode(raw, path)
    source = Source(path=path, text=text, data=None)
    try:
        _check_bounds(source)
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(source, exc) from None
    except yaml.YAMLError as exc:
        raise SpecError(source.diagnostic("E001", f"invalid YAML: {exc}", Span(1, 1))) from None
    if root is None:
        raise SpecError(
            source.diagnostic(
                "E005", "the spec is empty", Span(1, 1), hint="start from one of the specs in specs/"
            )
        )
    if not isinstance(root, yaml.MappingNode):
        found = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise SpecError(
            source.diagnostic(
                "E006",
                f"the top level of a spec must be a mapping of keys, found {found}",
                _span(root),
                hint="write `name: ...`, `inputs: ...`, `nodes: ...` at the top level, without a leading '- '",
            )
        )
    builder = _Builder(source)
    data = builder.build(root, ())
    if builder.problems:
        raise SpecError(builder.problems)
    source.data = data
    source.spans[()] = (None, root)
    return source


def _decode(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        shown = before.split(b"\n")[-1].decode("utf-8", "replace")
        raise SpecError(
            Diagnostic(
                code="E004",
                name=name_of("E004"),
                message=f"the spec is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                file=str(path),
                span=Span(line, col),
                hint="save the file as UTF-8",
                source_line=shown,
            )
        ) from None
    return text.removeprefix("\ufeff")


def _check_bounds(source: Source) -> None:
    """Bound depth, values and characters (aliases expanded) in one pass over the events.

    Runs on the parser's event stream, before anything is composed, and stops
    at the first event past a limit, so its cost is bounded by the limits, not
    by the input. An alias counts as many values and characters as its
    anchor's whole value: that is what every later consumer will see.
    """
    loader = _Loader(source.text)
    # per open collection: (values, chars) seen before it started, and its anchor
    open_: list[tuple[int, int, str | None]] = []
    anchored: dict[str, tuple[int, int]] = {}  # anchor -> expanded (values, chars)
    values = chars = 0
    try:
        while (event := loader.get_event()) is not None:
            kind = type(event)
            if kind is yaml.ScalarEvent:
                values, chars = values + 1, chars + len(event.value)
                if event.anchor is not None:
                    anchored[event.anchor] = (1, len(event.value))
            elif kind is yaml.AliasEvent:
                # an alias of an anchor still open (a recursive alias) is left to the builder
                more, more_chars = anchored.get(event.anchor, (1, 0))
                values, chars = values + more, chars + more_chars
                if values > MAX_VALUES or chars > MAX_EXPANDED_CHARS:
                    raise _alias_bomb(source, event, values > MAX_VALUES)
            elif kind is yaml.SequenceStartEvent or kind is yaml.MappingStartEvent:
                open_.append((values, chars, event.anchor))
                values += 1
                if len(open_) > MAX_DEPTH:
                    raise SpecError(
                        source.diagnostic(
                            "E008",
                            f"lists and mappings nest more than {MAX_DEPTH} levels deep here",
                            _mark_span(event.start_mark),
                            hint="a spec nests a few levels (nodes -> node -> output); check for unclosed brackets",
                        )
                    )
            elif kind is yaml.SequenceEndEvent or kind is yaml.MappingEndEvent:
                before, before_chars, anchor = open_.pop()
                if anchor is not None:
                    anchored[anchor] = (values - before, chars - before_chars)
            else:
                continue
            if values > MAX_VALUES:
                raise SpecError(
                    source.diagnostic(
                        "E009",
                        f"the spec holds more than {MAX_VALUES:,} values (scalars, lists and mappings)",
                        _mark_span(event.start_mark),
                        hint="a spec describes a graph; put data in JSONL files named under `data:`",
                    )
                )
    finally:
        loader.dispose()


def _alias_bomb(source: Source, event: yaml.AliasEvent, by_count: bool) -> SpecError:
    what = f"{MAX_VALUES:,} values" if by_count else f"{MAX_EXPANDED_CHARS:,} characters"
    return SpecError(
        source.diagnostic(
            "E010",
            f"YAML aliases expand the spec to more than {what}; this alias `*{_clip(event.anchor)}` passes the limit",
            _mark_span(event.start_mark),
            hint="an alias repeats its anchor's whole value, and an alias inside an anchored value multiplies; "
            "write the value out or share less",
        )
    )


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mark_span(mark: yaml.Mark) -> Span:
    return Span(mark.line + 1, mark.column + 1)


class _Builder:
    """Builds plain data from the composed nodes, recording every entry's nodes.

    One walk does what PyYAML's constructor does for the safe schema, plus the
    span map and duplicate-key detection. Shared (aliased) nodes are built once
    and reused, as PyYAML does, so alias bombs stay cheap; a node that contains
    itself is an error. Merge keys and non-scalar tags (!!set, !!omap) go to
    PyYAML's constructor for that node.
    """

    def __init__(self, source: Source):
        self.source = source
        self.problems: list[Diagnostic] = []
        self.built: dict[int, Any] = {}
        self.building: set[int] = set()

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return _scalar(node, self.source)
        ident = id(node)
        if ident in self.built:
            return self.built[ident]
        if ident in self.building:
            raise SpecError(self.source.diagnostic("E001", "a YAML alias refers to a node that contains it", _span(node)))
        self.building.add(ident)
        if node.tag not in (_MAP, _SEQ) or (
            isinstance(node, yaml.MappingNode) and any(k.tag == _MERGE for k, _ in node.value)
        ):
            value = _construct(node, self.source)
        elif isinstance(node, yaml.SequenceNode):
            value = self._sequence(node, path)
        else:
            value = self._mapping(node, path)
        self.building.discard(ident)
        self.built[ident] = value
        return value

    def _sequence(self, node: yaml.SequenceNode, path: PathKey) -> list:
        spans, out = self.source.spans, []
        for i, item in enumerate(node.value):
            child = (*path, i)
            spans[child] = (None, item)
            out.append(self.build(item, child))
        return out

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict:
        spans, out = self.source.spans, {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(
                    self.source.diagnostic(
                        "E001", "a key must be a plain value, not a list or mapping", _span(key_node),
                        hint="write keys as plain words",
                    )
                )  # fmt: skip
                continue
            key = _scalar(key_node, self.source)
            if key in first_line:
                self.problems.append(
                    self.source.diagnostic(
                        "E002",
                        f"duplicate key '{key_node.value}' (first defined at line {first_line[key]})",
                        _span(key_node),
                        hint="YAML keeps only the last value of a repeated key; remove or rename one",
                    )
                )
                continue
            first_line[key] = key_node.start_mark.line + 1
            child = (*path, key_node.value)
            spans[child] = (key_node, value_node)
            out[key] = self.build(value_node, child)
        return out


_MAP, _SEQ, _MERGE = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_SCALARS = {
    "tag:yaml.org,2002:null": _CONSTRUCTOR.construct_yaml_null,
    "tag:yaml.org,2002:bool": _CONSTRUCTOR.construct_yaml_bool,
    "tag:yaml.org,2002:int": _CONSTRUCTOR.construct_yaml_int,
    "tag:yaml.org,2002:float": _CONSTRUCTOR.construct_yaml_float,
}


def _scalar(node: yaml.ScalarNode, source: Source) -> Any:
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    make = _SCALARS.get(node.tag)
    return make(node) if make is not None else _construct(node, source)


def _construct(node: yaml.Node, source: Source) -> Any:
    """PyYAML's safe constructor for what the fast walk does not handle."""
    try:
        return yaml.constructor.SafeConstructor().construct_document(node)
    except yaml.YAMLError as exc:  # e.g. an unknown tag, which composing accepts
        mark = getattr(exc, "problem_mark", None) or node.start_mark
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(
            source.diagnostic(
                "E001", f"invalid YAML: {problem}", Span(mark.line + 1, mark.column + 1),
                hint="dlngraph reads plain YAML: strings, numbers, true/false, lists and mappings",
            )
        ) from None  # fmt: skip


def _span(node: yaml.Node) -> Span:
    start, end = node.start_mark, node.end_mark
    return Span(start.line + 1, start.column + 1, end.line + 1, end.column + 1)


def _style(node: yaml.Node) -> str | None:
    return getattr(node, "style", None) if isinstance(node, yaml.ScalarNode) else None


def _syntax_error(source: Source, exc: yaml.MarkedYAMLError) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    span = Span(mark.line + 1, mark.column + 1) if mark else Span(1, 1)
    problem = exc.problem or "invalid YAML"
    context = f" ({exc.context})" if exc.context else ""
    hint = "check indentation and quoting; a ':' or '#' inside a value needs quotes"
    if "\t" in (source.line(span.line) or ""):
        hint = "YAML does not allow tabs for indentation; use spaces"
    return SpecError(source.diagnostic("E001", f"YAML syntax error: {problem}{context}", span, hint=hint))


def _file_error(path: Path, code: str, message: str, hint: str | None) -> SpecError:
    return SpecError(Diagnostic(code=code, name=name_of(code), message=message, file=str(path), hint=hint))
