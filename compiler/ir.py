"""The compiler's intermediate representation and its well-formedness check.

A compilation is a `Unit` that each pass returns a new copy of, filling in
what it guarantees. The graph is a networkx DiGraph (edge parent -> child)
whose nodes carry one frozen `PlanNode` (the one node model, compiler/plan.py)
under the key "data". Node kinds are a closed enum: adding one means adding a
runtime layer kind too (runtime/layers).
`lint(graph)` checks the graph's invariants; tests run it after every pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from dlngraph.capabilities import Capability
from dlngraph.spec import Spec
from dlngraph.yamlsource import Source

from dlngraph.compiler.plan import ExecutionPlan, NodeKind, PlanNode

CapabilityResolver = Callable[[str, object], frozenset[Capability]]
# (backend name, backend spec) -> how many tokens a text is for that backend's
# model, or None when the compiler cannot know (no tokenizer named).
TokenCounter = Callable[[str, object], Callable[[str], int] | None]


@dataclass(frozen=True)
class FieldProfile:
    """What the data pass learned about one split: rows and mean field lengths (chars)."""

    path: Path
    rows: int
    mean_chars: dict[str, float]  # over the sampled rows that have the field
    fields: tuple[str, ...]  # fields present in every sampled row
    first_without: dict[str, int] = field(default_factory=dict)  # a field in some rows -> first line lacking it


@dataclass(frozen=True)
class Unit:
    """One compilation; each pass returns a copy with more filled in."""

    path: Path
    raw: bytes | None = None
    source: Source | None = None
    spec: Spec | None = None
    graph: nx.DiGraph | None = None
    capabilities: dict[str, frozenset[Capability]] = field(default_factory=dict)
    profiles: dict[str, FieldProfile] | None = None  # split -> profile
    meta_prompts_checked: bool = False
    plan: ExecutionPlan | None = None
    capability_resolver: CapabilityResolver | None = None
    token_counter: TokenCounter | None = None


class LintError(AssertionError):
    """The graph broke an invariant: a compiler bug, never a user error."""


def lint(graph: nx.DiGraph) -> None:
    """Raise `LintError` unless `graph` is well formed."""
    for name, attrs in graph.nodes(data=True):
        data = attrs.get("data")
        if not isinstance(data, PlanNode):
            raise LintError(f"node {name!r} has no PlanNode")
        if data.name != name:
            raise LintError(f"node {name!r} carries data named {data.name!r}")
        if not isinstance(data.kind, NodeKind):
            raise LintError(f"node {name!r} has kind {data.kind!r} outside NodeKind")
        if tuple(sorted(graph.predecessors(name))) != data.parents:
            raise LintError(f"node {name!r}: edges {sorted(graph.predecessors(name))} != parents {data.parents}")
        if list(data.parents) != sorted(data.parents) or list(data.inputs) != sorted(data.inputs):
            raise LintError(f"node {name!r}: parents and inputs must be sorted")


def nodes(graph: nx.DiGraph) -> dict[str, PlanNode]:
    """Node name -> its data, sorted by name."""
    return {name: graph.nodes[name]["data"] for name in sorted(graph.nodes)}


# Properties a pass may require or guarantee, each checkable on a Unit.
PROPERTIES: dict[str, Callable[[Unit], bool]] = {
    "parsed": lambda u: u.source is not None and isinstance(u.source.data, dict),
    "validated": lambda u: u.spec is not None,
    "resolved": lambda u: u.graph is not None and _linted(u.graph),
    "acyclic": lambda u: u.graph is not None and nx.is_directed_acyclic_graph(u.graph),
    "capable": lambda u: u.spec is not None and set(u.capabilities) >= set(u.spec.backends),
    "data_checked": lambda u: u.profiles is not None,
    "meta_prompts_checked": lambda u: u.meta_prompts_checked,
    "planned": lambda u: u.plan is not None,
}


def _linted(graph: nx.DiGraph) -> bool:
    lint(graph)
    return True
