"""Pass 4, graph checks: the edge structure is a network that can be run and trained.

REQUIRES "resolved". GUARANTEES "acyclic": the graph has no cycle (each cycle
found is reported with its path, at the template variable that closes it), and
every node reaches a node listed under `outputs:` (otherwise it would run and
train for nothing). Both checks are linear in nodes + edges.
"""

from __future__ import annotations

from collections import deque

import networkx as nx

from dlngraph.errors import Diagnostic, SpecError
from dlngraph.yamlsource import Source

from dlngraph.compiler import templates
from dlngraph.compiler.ir import Unit

REQUIRES = frozenset({"resolved"})
GUARANTEES = frozenset({"acyclic"})


def run(unit: Unit) -> Unit:
    assert unit.graph is not None and unit.source is not None and unit.spec is not None
    problems = _cycles(unit.graph, unit.source) + _unreachable(unit.graph, set(unit.spec.outputs), unit.source)
    if problems:
        raise SpecError(problems)
    return unit


def _cycles(graph: nx.DiGraph, source: Source) -> list[Diagnostic]:
    out = []
    for component in nx.strongly_connected_components(graph):
        first = min(component)
        if len(component) == 1 and not graph.has_edge(first, first):
            continue
        path = _cycle_from(graph.subgraph(component), first)
        head, closing = path[0], path[-2]
        out.append(
            source.diagnostic(
                "E301",
                f"cycle: {' -> '.join(path)}",
                templates.variable_span(source, ("nodes", head, "template"), closing),
                node=head,
                hint=f"`{head}` reads `{closing}`, which depends on `{head}`; "
                "templates may read only upstream nodes",
            )
        )
    return out


def _cycle_from(component: nx.DiGraph, start: str) -> list[str]:
    """A cycle of `component` as a path starting and ending at its smallest node.

    The path follows data flow: each node is read by the next one.
    """
    edges = nx.find_cycle(component, source=start)
    ring = [u for u, _ in edges]
    at = ring.index(min(ring))
    ring = ring[at:] + ring[:at]
    return ring + [ring[0]]


def _unreachable(graph: nx.DiGraph, outputs: set[str], source: Source) -> list[Diagnostic]:
    reached = set(outputs)
    queue = deque(outputs)
    while queue:
        for parent in graph.predecessors(queue.popleft()):
            if parent not in reached:
                reached.add(parent)
                queue.append(parent)
    return [
        source.diagnostic(
            "E302",
            "node reaches no output",
            graph.nodes[name]["data"].span,
            node=name,
            hint="read it in a downstream template, list it under `outputs:`, or remove it",
        )
        for name in sorted(set(graph.nodes) - reached)
    ]
