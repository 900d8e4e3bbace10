"""The network as an inline SVG, from plan.json, by a small layered layout.

Columns are: the dataset inputs, then the plan's forward stages (topological
generations), then the dataset fields the outputs are scored against. Within a
column nodes are ordered by the mean row of their parents (one barycentre
sweep), which removes most crossings in the small DAGs specs describe. Pure
Python, so the same plan always draws the same picture on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

from dlngraph.compiler.plan import NodeKind

BOX_W, BOX_H = 150, 46
COL_GAP, ROW_GAP, MARGIN = 70, 26, 16


@dataclass(frozen=True)
class Box:
    key: str  # unique id: "in:<field>", "node:<name>", "out:<field>"
    label: str
    sublabel: str
    css: str  # input | node | hidden | output | target
    col: int
    row: float  # fractional when a short column is centred

    @property
    def x(self) -> int:
        return MARGIN + self.col * (BOX_W + COL_GAP)

    @property
    def y(self) -> float:
        return MARGIN + self.row * (BOX_H + ROW_GAP)


def _columns(plan: dict[str, Any]) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """Box keys per column (unordered within a column) and the edges between them."""
    nodes = plan["nodes"]
    inputs = sorted({f for n in nodes.values() for f in n.get("inputs", [])})
    stages = [sorted(stage["nodes"]) for stage in plan.get("forward", [])] or [sorted(nodes)]
    targets = sorted({n["target"] for n in nodes.values() if n.get("target")})
    columns = [[f"in:{f}" for f in inputs]] + [[f"node:{n}" for n in s] for s in stages]
    columns.append([f"out:{t}" for t in targets])
    edges = []
    for name, node in sorted(nodes.items()):
        edges += [(f"in:{f}", f"node:{name}") for f in node.get("inputs", [])]
        edges += [(f"node:{p}", f"node:{name}") for p in node.get("parents", [])]
        if node.get("target"):
            edges.append((f"node:{name}", f"out:{node['target']}"))
    return [c for c in columns if c], sorted(set(edges))


def _order(columns: list[list[str]], edges: list[tuple[str, str]]) -> list[list[str]]:
    """One left-to-right barycentre sweep; ties keep alphabetical order."""
    row: dict[str, float] = {key: i for i, key in enumerate(columns[0])}
    ordered = [columns[0]]
    for column in columns[1:]:
        def centre(key: str) -> float:
            parents = [row[a] for a, b in edges if b == key and a in row]
            return sum(parents) / len(parents) if parents else float("inf")

        column = sorted(column, key=lambda k: (centre(k), k))
        row.update({key: i for i, key in enumerate(column)})
        ordered.append(column)
    return ordered


def _box(key: str, col: int, row: int, nodes: dict[str, Any]) -> Box:
    kind, name = key.split(":", 1)
    if kind == "in":
        return Box(key, name, "input", "input", col, row)
    if kind == "out":
        return Box(key, name, "target", "target", col, row)
    node = nodes[name]
    detail = node.get("output_type", "")
    if node.get("kind") == NodeKind.DEEP_THINKING:
        detail = "deep thinking"
    role = "output" if node.get("target") else "hidden"
    return Box(key, name, f"{detail} · {node.get('backend', '')}", role, col, row)


def layout(plan: dict[str, Any]) -> tuple[list[Box], list[tuple[str, str]]]:
    columns, edges = _columns(plan)
    if not columns:  # a plan.json with no nodes (a damaged run): nothing to draw
        return [], []
    columns = _order(columns, edges)
    height = max(len(c) for c in columns)
    boxes = []
    for col, keys in enumerate(columns):
        offset = (height - len(keys)) / 2  # centre short columns vertically
        boxes += [_box(k, col, row + offset, plan["nodes"]) for row, k in enumerate(keys)]
    return boxes, edges


def _edge_path(a: Box, b: Box) -> str:
    x1, y1 = a.x + BOX_W, a.y + BOX_H / 2
    x2, y2 = b.x - 4, b.y + BOX_H / 2
    bend = (x2 - x1) / 2
    return f"M{x1:.0f},{y1:.0f} C{x1 + bend:.0f},{y1:.0f} {x2 - bend:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"


def network_svg(plan: dict[str, Any]) -> str:
    """An <svg> element drawing the plan's DAG, left (inputs) to right (targets)."""
    boxes, edges = layout(plan)
    if not boxes:
        return '<svg class="network" role="img" aria-label="network diagram: no nodes" width="0" height="0"></svg>'
    by_key = {b.key: b for b in boxes}
    width = max(b.x for b in boxes) + BOX_W + MARGIN
    height = max(b.y for b in boxes) + BOX_H + MARGIN
    parts = [
        f'<svg class="network" role="img" aria-label="network diagram" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>',
    ]
    for a, b in edges:
        parts.append(
            f'<path class="edge" d="{_edge_path(by_key[a], by_key[b])}" fill="none" stroke="#889" '
            f'stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
    for box in boxes:
        cx = box.x + BOX_W / 2
        parts.append(
            f'<g class="box {box.css}" data-key="{escape(box.key)}">'
            f'<rect x="{box.x}" y="{box.y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="8"/>'
            f'<text x="{cx:.0f}" y="{box.y + 19:.0f}" class="label">{escape(box.label)}</text>'
            f'<text x="{cx:.0f}" y="{box.y + 36:.0f}" class="sub">{escape(box.sublabel)}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
