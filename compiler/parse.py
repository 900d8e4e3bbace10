"""Pass 1, parse: the spec's bytes -> YAML data with a path -> span map.

REQUIRES nothing. GUARANTEES "parsed": `unit.source` holds a mapping and the
span of every key and value. File-level mistakes (size, encoding, syntax,
duplicate keys, empty file, a top level that is not a mapping) are SpecErrors.
"""

from __future__ import annotations

from dataclasses import replace

from dlngraph.yamlsource import load_source, parse_source

from dlngraph.compiler.ir import Unit

REQUIRES: frozenset[str] = frozenset()
GUARANTEES = frozenset({"parsed"})


def run(unit: Unit) -> Unit:
    source = load_source(unit.path) if unit.raw is None else parse_source(unit.raw, unit.path)
    return replace(unit, source=source)
