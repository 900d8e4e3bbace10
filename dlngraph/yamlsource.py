"""Loading a spec's YAML once, keeping where every key and value sits.

`load_source(path)` composes the file with PyYAML (libyaml when present) and
returns a `Source`: the plain data plus a map from a path of keys/indices
(``("nodes", "answer", "template")``) to the spans of that key and its value,
so later passes can point errors at the user's own text. File-level mistakes
(too big, not UTF-8, empty, YAML syntax, duplicate keys, a top level that is
not a mapping) are `SpecError`s here. This module imports only dlngraph.errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlngraph.codes import name_of
from dlngraph.errors import Diagnostic, SpecError, Span

MAX_SPEC_BYTES = 16 * 1024 * 1024  # large enough for a 50,000-node generated spec

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
    """Read and compose `path`; file-level problems raise `SpecError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _file_error(path, "E007", f"spec file not found: {path}", "check the path") from None
    except OSError as exc:
        raise _file_error(path, "E007", f"cannot read the spec file: {exc.strerror}", None) from None
    return parse_source(raw, path)


def parse_source(raw: bytes, path: Path) -> Source:
    """Compose `raw` (the bytes of the file at `path`) into a `Source`."""
    if len(raw) > MAX_SPEC_BYTES:
        raise _file_error(
            path,
            "E003",
            f"spec file is {len(raw):,} bytes, more than the limit of {MAX_SPEC_BYTES:,}",
            "a spec describes a graph; put data in JSONL files named under `data:`",
        )
    text = _decode(raw, path)
    source = Source(path=path, text=text, data=None)
    try:
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
