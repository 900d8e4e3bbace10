"""A layer whose output is one of a fixed set of labels.

Forward scores every choice as a continuation of the rendered prompt and picks
the most likely; its log-probs are normalized over the choices (so they read as
a distribution over labels). All examples x all choices go to the backend in
ONE `score` call, with the rendered instruction as the shared prefix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from dlngraph.compiler.plan import PlanNode
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime.layers.base import ForwardRecord, Row
from dlngraph.runtime.template import render, score_request
from dlngraph.spec import LayerNode


def forward(node: PlanNode, spec: LayerNode, backend: Backend, prompt: str, rows: list[Row]) -> ForwardRecord:
    started = time.perf_counter()
    choices = list(spec.output.choices)  # type: ignore[union-attr]
    rendered = [render(spec.template, prompt, row, node=node.name) for row in rows]
    scored = choice_logprobs(node, spec, backend, [(prompt, row) for row in rows])
    # max() keeps the first of tied choices, so ties break by the spec's order.
    outputs = [max(choices, key=lambda c: lp[c]) for lp in scored]
    return ForwardRecord(
        node=node.name,
        prompt=prompt,
        rendered=rendered,
        outputs=outputs,
        choice_logprobs=scored,
        seconds=time.perf_counter() - started,
    )


def choice_logprobs(
    node: PlanNode, spec: LayerNode, backend: Backend, pairs: Sequence[tuple[str, Row]]
) -> list[dict[str, float]]:
    """Per (prompt, row): class-normalized log-prob of every choice, from one score call."""
    choices = list(spec.output.choices)  # type: ignore[union-attr]
    requests = [
        score_request(spec.template, prompt, row, choice, node=node.name)
        for prompt, row in pairs
        for choice in choices
    ]
    scores = backend.score(requests)
    out = []
    for start in range(0, len(scores), len(choices)):
        totals = [s.total for s in scores[start : start + len(choices)]]
        norm = _logsumexp(totals)
        out.append({c: t - norm for c, t in zip(choices, totals)})
    return out


def target_logprobs(
    node: PlanNode, spec: LayerNode, backend: Backend, items: Sequence[tuple[str, Row, str]]
) -> list[float]:
    """Class-normalized log-prob of each (prompt, row, target) in one score call,
    so N candidate prompts x B examples cost one batched backend call."""
    scored = choice_logprobs(node, spec, backend, [(prompt, row) for prompt, row, _ in items])
    out = []
    for (_, _, target), lp in zip(items, scored):
        if target not in lp:
            raise RuntimeFailure(
                f"target {target!r} is not one of the choices {sorted(lp)}",
                node=node.name,
                hint="the dataset's labels must be spelled exactly like the node's choices",
            )
        out.append(lp[target])
    return out


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))
