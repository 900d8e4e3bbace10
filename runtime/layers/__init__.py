"""The one registry of layer kinds, used by the executor and the trainer alike.

`LAYERS[node.layer_key]` makes the node's layer (runtime/layers/base.py `Layer`):
`(plan, name, backend, run_dir) -> Layer`. Deep-Thinking needs torch, so its
module is imported only when a spec has such a node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dlngraph.compiler.plan import ExecutionPlan, NodeKind
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime.layers.base import Layer
from dlngraph.runtime.layers.choice import ChoiceLayer
from dlngraph.runtime.layers.text import TextLayer

LayerFactory = Callable[[ExecutionPlan, str, Backend, Path | None], Layer]


def _deep_thinking(plan: ExecutionPlan, name: str, backend: Backend, run_dir: Path | None) -> Layer:
    try:
        from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer
    except ImportError as exc:
        raise RuntimeFailure("deep_thinking nodes are not available in this build", node=name) from exc
    return DeepThinkingLayer.from_plan(plan, name, backend, run_dir=run_dir)


LAYERS: dict[tuple[NodeKind, str], LayerFactory] = {
    (NodeKind.LAYER, "choice"): ChoiceLayer,
    (NodeKind.LAYER, "text"): TextLayer,
    (NodeKind.DEEP_THINKING, "choice"): _deep_thinking,
}


def bind(plan: ExecutionPlan, name: str, backend: Backend, run_dir: Path | None = None) -> Layer:
    """Node `name`'s layer, bound to its plan node and `backend`."""
    return LAYERS[plan.nodes[name].layer_key](plan, name, backend, run_dir)
