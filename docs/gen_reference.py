"""The spec reference page, generated from the spec's JSON Schema.

Used as a mkdocs hook (`hooks:` in mkdocs.yml): `on_files` adds `reference.md`
to the site without writing it into docs/, so it can never go stale. Run it as
a script to print the page: `python docs/gen_reference.py`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

INTRO = """# Spec reference

Every key a spec file may contain, generated from the spec's JSON Schema
(`dlngraph.spec.json_schema()`, which `dlngraph schema` prints). Every object
rejects unknown keys. Types link to the section describing them.

`backends` defaults to one torch backend named `local` running the embedded
model (`{local: {kind: torch}}`); `default_backend` defaults to the first backend.
"""


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A short markdown rendering of a property's type."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " \\| ".join(_type(s) for s in schema[key])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of name → {_type(schema['additionalProperties'])}"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}.get(kind, kind)


def _constraints(schema: dict[str, Any]) -> str:
    words = {
        "minimum": "≥ {}", "exclusiveMinimum": "> {}", "maximum": "≤ {}", "exclusiveMaximum": "< {}",
        "minLength": "length ≥ {}", "minItems": "length ≥ {}", "minProperties": "entries ≥ {}",
        "pattern": "matches `{}`",
    }
    return ", ".join(fmt.format(schema[key]) for key, fmt in words.items() if key in schema)


def _default(model: Any, key: str, schema: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" in schema:
        return f"`{json.dumps(schema['default'])}`"
    # A default_factory leaves no default in the schema: ask the pydantic model.
    factory = model.model_fields[key].default_factory
    value = factory()
    if isinstance(value, BaseModel):
        return "defaults of its keys"
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:  # holds models (backends): described in the intro
        return "see above"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(name: str, schema: dict[str, Any], model: Any) -> str:
    lines = [f"## {name}", ""]
    if schema.get("description"):
        lines += [schema["description"], ""]
    lines += ["| key | type | default | notes |", "| --- | --- | --- | --- |"]
    required = set(schema.get("required", []))
    for key, prop in schema.get("properties", {}).items():
        notes = "; ".join(x for x in (prop.get("description", ""), _constraints(prop)) if x)
        lines.append(f"| `{key}` | {_type(prop)} | {_default(model, key, prop, key in required)} | {_cell(notes)} |")
    return "\n".join(lines) + "\n"


def _refs(schema: Any) -> list[str]:
    """$ref names in SCHEMA, in document order."""
    if isinstance(schema, dict):
        own = [_ref_name(schema["$ref"])] if "$ref" in schema else []
        return own + [r for value in schema.values() for r in _refs(value)]
    if isinstance(schema, list):
        return [r for value in schema for r in _refs(value)]
    return []


def render(schema: dict[str, Any], models: Any) -> str:
    """The whole page: the top-level keys, then each model in the order it is first referenced.

    MODELS is the module defining the pydantic models (their class names are the schema titles).
    """
    defs = schema.get("$defs", {})
    order: list[str] = []
    queue = _refs(schema.get("properties", {}))
    while queue:
        name = queue.pop(0)
        if name not in order:
            order.append(name)
            queue += _refs(defs[name])
    order += sorted(set(defs) - set(order))
    parts = [INTRO, _section("Top level", schema, models.Spec)]
    parts += [_section(name, defs[name], getattr(models, name)) for name in order]
    return "\n".join(parts)


def on_files(files: Any, config: Any) -> Any:  # mkdocs hook
    from mkdocs.structure.files import File

    from dlngraph import spec

    files.append(File.generated(config, "reference.md", content=render(spec.json_schema(), spec)))
    return files


if __name__ == "__main__":
    from dlngraph import spec

    print(render(spec.json_schema(), spec))
