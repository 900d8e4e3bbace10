"""A layer whose output is free text (a hidden layer's reasoning, an answer).

Forward renders the template for every example and generates in ONE batched
call. `target_logprobs` scores given texts as continuations (mean token
log-prob), all items in one score call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dlngraph.compiler.plan import PlanNode
from dlngraph.runtime.backends.base import Backend, GenerateRequest
from dlngraph.runtime.layers.base import ForwardRecord, Row
from dlngraph.runtime.template import render, score_request
from dlngraph.spec import LayerNode


def forward(
    node: PlanNode, spec: LayerNode, backend: Backend, prompt: str, rows: list[Row], *, seed: int = 0
) -> ForwardRecord:
    started = time.perf_counter()
    output = spec.output
    rendered = [render(spec.template, prompt, row, node=node.name) for row in rows]
    requests = [
        GenerateRequest(
            prompt=text,
            max_tokens=output.max_tokens,  # type: ignore[union-attr]
            temperature=output.temperature,  # type: ignore[union-attr]
            stop=tuple(output.stop),  # type: ignore[union-attr]
            seed=seed,
        )
        for text in rendered
    ]
    generations = backend.generate(requests)
    return ForwardRecord(
        node=node.name,
        prompt=prompt,
        rendered=rendered,
        outputs=[g.texts[0].strip() for g in generations],
        seconds=time.perf_counter() - started,
    )


def target_logprobs(
    node: PlanNode, spec: LayerNode, backend: Backend, items: Sequence[tuple[str, Row, str]]
) -> list[float]:
    """Mean token log-prob of each (prompt, row, target text), in one score call."""
    requests = [score_request(spec.template, prompt, row, target, node=node.name) for prompt, row, target in items]
    return [s.mean for s in backend.score(requests)]
