"""Pass 2, validate: YAML data -> a `Spec`, with pydantic errors at the user's text.

REQUIRES "parsed". GUARANTEES "validated": `unit.spec` is a `Spec`.
Every pydantic error becomes a Diagnostic: unknown keys (with a did-you-mean)
and missing keys point at the key, bad values at the value. Pydantic's union
tags ('layer', 'choice', ...) in an error's location are dropped by walking
the location against the data itself. An unknown node `kind` is reported once
as such, instead of as the layer errors pydantic would list for it.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from dataclasses import replace
from typing import Any

import jinja2
from pydantic import BaseModel, Tag, ValidationError

from dlngraph.errors import MAX_COLLECTED, Diagnostic, SpecError
from dlngraph.spec import LayerNode, Spec
from dlngraph.yamlsource import PathKey, Source

from dlngraph.compiler import templates
from dlngraph.compiler.ir import NodeKind, Unit

REQUIRES = frozenset({"parsed"})
GUARANTEES = frozenset({"validated"})

_TYPE_ERRORS = frozenset(
    {
        "string_type", "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
        "bool_type", "bool_parsing", "dict_type", "list_type", "model_type", "model_attributes_type",
        "none_required", "mapping_type", "tuple_type", "set_type",
    }
)  # fmt: skip


def run(unit: Unit) -> Unit:
    assert unit.source is not None
    source = unit.source
    diagnostics, bad_kind_nodes = _unknown_node_kinds(source)
    try:
        spec = Spec.model_validate(source.data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # a flood (400,000 unknown keys) is counted, not built: a did-you-mean costs ~0.2 ms
        for error in errors[:MAX_COLLECTED]:
            path, raw = _clean_loc(source.data, error["loc"])
            if len(path) >= 2 and path[0] == "nodes" and path[1] in bad_kind_nodes:
                continue
            diagnostics.append(_diagnostic(source, error, path, raw))
        raise SpecError(_dedupe(diagnostics), omitted=max(0, len(errors) - MAX_COLLECTED)) from None
    diagnostics += _check_learning(spec, source)
    if diagnostics:
        raise SpecError(diagnostics)
    return replace(unit, spec=spec)


def _check_learning(spec: Spec, source: Source) -> list[Diagnostic]:
    """What pydantic cannot see of a layer's learnable parts: demonstrations its
    template does not read (or reads without having them), demonstrations on a
    node without labels, calibration of a text output, a proposer that is not a backend."""
    out: list[Diagnostic] = []
    for name, node in spec.nodes.items():
        if not isinstance(node, LayerNode):
            continue
        try:
            reads = "demos" in templates.variables(node.template)
        except jinja2.TemplateSyntaxError:
            continue  # resolve reports the syntax error
        if node.demos is not None and not reads:
            out.append(source.diagnostic(
                "E209", "the node has `demos:` but its template does not read `{{ demos }}`",
                source.key_span(("nodes", name, "demos")), node=name,
                hint="put `{{ demos }}` in the template where the demonstrations go (after the "
                "instruction, before the input), or remove `demos:`",
            ))
        elif reads and node.demos is None:
            out.append(source.diagnostic(
                "E209", "the template reads `{{ demos }}` but the node has no `demos:`",
                templates.variable_span(source, ("nodes", name, "template"), "demos"), node=name,
                hint="add `demos: {count: 8}` to the node (demonstrations drawn from train), or remove `{{ demos }}`",
            ))
        elif node.demos is not None and name not in spec.outputs and node.demos.examples is None:
            out.append(source.diagnostic(
                "E209", "demonstrations need labels: the node is not listed in `outputs:`",
                source.key_span(("nodes", name, "demos")), node=name,
                hint="give demonstrations to an output node (its target field is the label), "
                "or list fixed `examples:` under `demos:`",
            ))
        if node.calibration != "none" and node.output.type != "choice":
            out.append(source.diagnostic(
                "E104", f"calibration `{node.calibration}` applies to choice outputs only",
                source.value_span(("nodes", name, "calibration")), node=name,
                hint="calibration divides a label prior out of choice scores; remove it from a text layer",
            ))
    proposer = spec.train.proposer
    if proposer is not None and proposer not in spec.backends:
        close = difflib.get_close_matches(proposer, sorted(spec.backends), n=1)
        out.append(source.diagnostic(
            "E203", f"`train.proposer` names backend '{proposer}', which is not defined",
            source.value_span(("train", "proposer")),
            hint=(f"did you mean '{close[0]}'? " if close else "") + f"backends: {', '.join(sorted(spec.backends))}",
        ))
    return out


def _unknown_node_kinds(source: Source) -> tuple[list[Diagnostic], set[str]]:
    nodes = source.data.get("nodes")
    if not isinstance(nodes, dict):
        return [], set()
    diagnostics, bad = [], set()
    known = [k.value for k in NodeKind]
    for name, node in nodes.items():
        kind = node.get("kind") if isinstance(node, dict) else None
        if kind is None or kind in known:
            continue
        bad.add(name)
        diagnostics.append(
            source.diagnostic(
                "E105",
                f"unknown node kind {kind!r}",
                source.value_span(("nodes", str(name), "kind")),
                node=str(name),
                hint=_did_you_mean(str(kind), known, "node kinds are"),
            )
        )
    return diagnostics, bad


def _clean_loc(data: Any, loc: tuple[str | int, ...]) -> tuple[PathKey, tuple[str | int, ...]]:
    """(the location as a path through the data, the raw loc) with union tags dropped.

    A loc element is kept if the data at that point has it; otherwise it is a
    tag, unless it is the last element (a missing or unknown key).
    """
    path: list[str | int] = []
    cursor = data
    for i, element in enumerate(loc):
        if element == "[key]":
            break
        last = i == len(loc) - 1
        if isinstance(cursor, dict) and element in cursor:
            path.append(element if isinstance(element, str) else str(element))
            cursor = cursor[element]
        elif isinstance(cursor, list) and isinstance(element, int) and element < len(cursor):
            path.append(element)
            cursor = cursor[element]
        elif last:
            path.append(element)
    return tuple(path), loc


def _diagnostic(source: Source, error: dict, path: PathKey, raw: tuple) -> Diagnostic:
    kind = error["type"]
    node = str(path[1]) if len(path) >= 2 and path[0] == "nodes" else None
    where = ".".join(str(p) for p in path) or "the spec"
    if raw and raw[-1] == "[key]":
        return source.diagnostic(
            "E103",
            f"{where}: names must be strings, got {_short(error['input'])}",
            source.key_span(path),
            node=node,
            hint="quote the name",
        )
    if kind == "missing":
        parent = ".".join(str(p) for p in path[:-1]) or "the top level"
        return source.diagnostic(
            "E102",
            f"missing required key '{path[-1]}' in {parent}",
            source.key_span(path[:-1]),
            node=node,
            hint=f"add `{path[-1]}:` to {parent}",
        )
    if kind == "extra_forbidden":
        fields = _fields_at(raw[:-1])
        return source.diagnostic(
            "E101",
            f"unknown key '{path[-1]}' in {'.'.join(str(p) for p in path[:-1]) or 'the top level'}",
            source.key_span(path),
            node=node,
            hint=_did_you_mean(str(path[-1]), fields, "valid keys here are"),
        )
    message = error["msg"].removeprefix("Value error, ")
    if kind in _TYPE_ERRORS:
        return source.diagnostic(
            "E103",
            f"{where}: {message}, got {_short(error['input'])}",
            source.value_span(path),
            node=node,
            hint="quote strings that look like numbers or booleans; `dlngraph schema` shows each key's type",
        )
    described = _description_at(raw)
    return source.diagnostic(
        "E104", f"{where}: {message}", source.value_span(path), node=node,
        hint=f"`{path[-1]}`: {described}" if described else "see `dlngraph schema` for the allowed values",
    )  # fmt: skip


def _did_you_mean(word: str, candidates: list[str], listing: str) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    allowed = f"{listing}: {', '.join(sorted(candidates))}" if candidates else ""
    if close:
        return f"did you mean '{close[0]}'? ({allowed})" if allowed else f"did you mean '{close[0]}'?"
    return allowed or "remove it"


# reprlib stops after a few items and levels, so the repr of a huge (alias-expanded)
# value costs as little as a small one's; repr() would build all of it first.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 3, 4, 4, 40


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dedupe(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diagnostics:
        key = (d.span, d.code, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


# --------------------------------------------------------------------------- did-you-mean


def _fields_at(raw_loc: tuple) -> list[str]:
    """Field names of the model a pydantic loc (tags included) points into."""
    model = _model_at(raw_loc)
    return list(model.model_fields) if model else []


def _description_at(raw_loc: tuple) -> str | None:
    """The spec model's description of the field a pydantic loc ends at, if it has one."""
    model = _model_at(raw_loc[:-1]) if raw_loc else None
    info = model.model_fields.get(str(raw_loc[-1])) if model else None
    return info.description if info else None


def _model_at(raw_loc: tuple) -> Any:
    """The pydantic model a loc (tags included) points into, or None."""
    annotation: Any = Spec
    for element in raw_loc:
        annotation = _step(annotation, element)
        if annotation is None:
            return None
    return _as_model(annotation)


def _step(annotation: Any, element: str | int) -> Any:
    model = _as_model(annotation)
    if model is not None:
        info = model.model_fields.get(str(element))
        return info.annotation if info else None
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _step(typing.get_args(annotation)[0], element)
    if origin in (dict, list):
        return typing.get_args(annotation)[-1]
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        for member in members:
            if _tag_of(member) == element:
                return member
        real = [m for m in members if m is not type(None)]
        return _step(real[0], element) if len(real) == 1 else None
    return None


def _tag_of(member: Any) -> Any:
    if typing.get_origin(member) is typing.Annotated:
        for meta in typing.get_args(member)[1:]:
            if isinstance(meta, Tag):
                return meta.tag
        member = typing.get_args(member)[0]
    model = _as_model(member)
    for name in ("type", "kind"):
        info = model.model_fields.get(name) if model else None
        if info is not None and info.default is not None:
            return info.default
    return None


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None
