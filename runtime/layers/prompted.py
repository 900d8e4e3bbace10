"""What text and choice layers share: a language layer with a learnable prompt.

Its parameters (`Params`) are an instruction, the demonstrations its template
shows as `{{ demos }}` and, for a calibrated choice node, a fitted label prior;
before any fit they are the spec's (`params`).
"""

from __future__ import annotations

from pathlib import Path

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.runtime import demos
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime.layers.base import Params, Row
from dlngraph.runtime.template import render
from dlngraph.spec import LayerNode


class PromptedLayer:
    def __init__(self, plan: ExecutionPlan, name: str, backend: Backend, run_dir: Path | None = None) -> None:
        node = plan.nodes[name]
        assert isinstance(node.spec, LayerNode), name
        self.plan, self.node, self.spec, self.backend = plan, node, node.spec, backend

    def params(self, seed: int) -> Params:
        """The spec's parameters: its prompt, its demonstrations (fixed, or a balanced
        draw from train seeded by (seed, node)) and its fitted prior if it has one."""
        bias = self.spec.calibration_bias
        shown = demos.initial(self.plan, self.node.name, seed)
        return Params(self.spec.prompt, shown, tuple(sorted(bias.items())) if bias is not None else None)

    def demos_text(self, params: Params) -> str:
        return demos.text_of(self.spec, params.demos, node=self.node.name)

    def render(self, params: Params, row: Row) -> str:
        """The text the node sends for one example under `params`."""
        return render(self.spec.template, params.prompt, row, node=self.node.name, demos=self.demos_text(params))
