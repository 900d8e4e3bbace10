"""Property tests: any input gives a plan or a SpecError, never another exception.

Random YAML documents, random text and byte-level and structural mutations of
the example specs go through the whole compiler. Mutated specs compile with
the example's path, so their data files resolve and the later passes run too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jinja2
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlngraph.errors import SpecError
from dlngraph.compiler.pipeline import compile_unit
from dlngraph.compiler.templates import parsed_variables, variables

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
VIRTUAL = ROOT / "tests" / "fuzzed-spec.yaml"  # never read: the bytes are passed in
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=False, width=32),
    st.text(max_size=12), st.sampled_from(["{{ input }}", "{{ prompt }}", "{% if x %}", "torch", "choice", "text"]),
)  # fmt: skip
keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(
        ["name", "inputs", "nodes", "outputs", "backends", "data", "train", "kind", "template", "output", "prompt",
         "choices", "backend", "type", "deep_thinking", "demo_template", "iterations", "local", "answer", "input"]
    ),
)  # fmt: skip
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=25)


def _compiles_or_spec_error(raw: bytes, path: Path) -> None:
    try:
        unit = compile_unit(path, raw=raw)
    except SpecError as exc:
        assert exc.diagnostics
        for d in exc.diagnostics:
            assert d.span.line >= 1 and d.span.col >= 1
            assert d.render().splitlines()[0] == d.headline
        return
    assert unit.plan is not None
    unit.plan.to_json()


@SETTINGS
@given(documents)
def test_random_yaml_documents(document: object) -> None:
    _compiles_or_spec_error(yaml.safe_dump(document, allow_unicode=True).encode(), VIRTUAL)


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_and_text(raw: bytes) -> None:
    _compiles_or_spec_error(raw, VIRTUAL)


@SETTINGS
@given(st.sampled_from(SPECS), st.data())
def test_text_mutations_of_valid_specs(spec: Path, data: st.DataObject) -> None:
    text = bytearray(spec.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text) - 1))
        action = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        piece = data.draw(st.sampled_from([b"{", b"}", b":", b" ", b"\n", b"-", b"[", b"'", b"\t", b"#", b"x", b"\xff"]))
        if action == "delete":
            del text[at : at + data.draw(st.integers(1, 20))]
        elif action == "insert":
            text[at:at] = piece
        else:
            text[at : at + 1] = piece
    _compiles_or_spec_error(bytes(text), spec)


@SETTINGS
@given(st.sampled_from(SPECS), st.data())
def test_structural_mutations_of_valid_specs(spec: Path, data: st.DataObject) -> None:
    document = yaml.safe_load(spec.read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(document, data)
    _compiles_or_spec_error(yaml.safe_dump(document, allow_unicode=True).encode(), spec)


def _mutate(document: dict, data: st.DataObject) -> None:
    """Delete, replace, rename or duplicate one entry somewhere in the document."""
    container, key = _pick(document, data)
    action = data.draw(st.sampled_from(["delete", "replace", "rename", "copy"]))
    if action == "delete":
        del container[key]
    elif action == "replace":
        container[key] = data.draw(documents)
    elif action == "rename" and isinstance(container, dict):
        container[data.draw(keys)] = container.pop(key)
    elif isinstance(container, dict):
        container[data.draw(keys)] = copy.deepcopy(container[key])


def _pick(document: dict, data: st.DataObject) -> tuple[dict | list, str | int]:
    container: dict | list = document
    while True:
        options = list(container) if isinstance(container, dict) else list(range(len(container)))
        key = data.draw(st.sampled_from(options))
        child = container[key]
        if not isinstance(child, dict | list) or not child or data.draw(st.booleans()):
            return container, key
        container = child


template_text = st.text(alphabet="{}%#-|x_ab \n'\"", max_size=30) | st.lists(
    st.sampled_from(["{{ a }}", "{{b}}", "{{ x_1 }}", "{{ true }}", "{ ", "}}", "{{", "{%", "text ", "{{- a }}", "\n"]),
    max_size=6,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(template_text)
def test_template_fast_path_agrees_with_the_jinja_parse(text: str) -> None:
    try:
        expected = parsed_variables(text)
    except jinja2.TemplateSyntaxError:
        with pytest.raises(jinja2.TemplateSyntaxError):
            variables(text)
        return
    assert variables(text) == expected


template_programs = st.lists(
    st.sampled_from(
        ["{{ input }}", "{{ prompt }}", "{% for i in range(1000) %}", "{% for c in input * 1000 %}", "{% endfor %}",
         "{{ 'ab' * 700000 }}", "{{ input ~ input }}", "{% set s = input * 500000 %}", "{{ s ~ s ~ s }}", "{{ [s, s] }}",
         "{{ s | replace('x', 'xyz') }}", "{{ input | center(5) }}", "{{ 2 ** 64 }}", "{{ 1 / 0 }}", "{{ input.upper() }}",
         "{% macro m() %}", "{% endmacro %}", "{{ m() }}", "{{ ''.__class__ }}", "{{ undefined_name }}", "text ", "\n",
         "{% if input %}", "{% endif %}", "{{ range(10) | list | join(',') }}", "{{ '%s' % input }}", "{{"]
    ),
    max_size=8,
).map("".join)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(template_programs)
def test_any_template_renders_within_bounds_or_fails_cleanly(text: str) -> None:
    import time
    from unittest import mock

    from dlngraph import sandbox
    from dlngraph.errors import RuntimeFailure
    from dlngraph.runtime.template import render

    with mock.patch.object(sandbox, "MAX_RENDER_SECONDS", 0.05):
        started = time.monotonic()
        try:
            out = render(text, "P", {"input": "x"}, node="n")
        except RuntimeFailure as exc:
            assert "node 'n'" in str(exc)
        else:
            assert len(out) <= sandbox.MAX_CHARS
        assert time.monotonic() - started < 1.0
