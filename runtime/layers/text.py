"""A layer whose output is free text (a hidden layer's reasoning, an answer).

Forward renders the template for every example and generates in ONE batched
call. `target_logprobs` scores given texts as continuations (mean token
log-prob), all items in one score call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dlngraph.compiler.plan import PlanNode
from dlngraph.runtime.backends.base import Backend, GenerateRequest, Generation
from dlngraph.runtime.backward import Deferred, TargetScore, render_meta, run_now, shown_input, stable_seed
from dlngraph.runtime import demos
from dlngraph.runtime.layers.base import ForwardRecord, Params, Row
from dlngraph.runtime.template import render, score_request
from dlngraph.spec import LayerNode, TrainSpec


def forward(
    node: PlanNode, spec: LayerNode, backend: Backend, params: Params, rows: list[Row], *, seed: int = 0
) -> ForwardRecord:
    started = time.perf_counter()
    output = spec.output
    shown = demos.text_of(spec, params.demos, node=node.name)
    rendered = [render(spec.template, params.prompt, row, node=node.name, demos=shown) for row in rows]
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
        prompt=params.prompt,
        rendered=rendered,
        outputs=[g.texts[0].strip() for g in generations],
        seconds=time.perf_counter() - started,
    )


def target_logprobs(
    node: PlanNode, spec: LayerNode, backend: Backend, items: Sequence[tuple[Params, Row, str]]
) -> list[float]:
    """Mean token log-prob of each (params, row, target text), in one score call."""
    return [s.logprob for s in run_now(target_scores(node, spec, items), backend)]


# ---------------------------------------------------------------------- backward
# Nothing here calls a model: each function returns the requests (Deferred) so
# the trainer merges every node of a backward stage into one call per backend.


def target_scores(node: PlanNode, spec: LayerNode, items: Sequence[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
    """Mean token log-prob of each (params, row, target text) followed by the output's
    first stop sequence, i.e. of the whole generation including its end. So an empty
    target (end-of-text first) is a scored outcome, not a free log-prob of 0."""
    end = spec.output.stop[0] if spec.output.stop else ""  # type: ignore[union-attr]
    requests = [
        score_request(
            spec.template, p.prompt, row, target + end, node=node.name, demos=demos.text_of(spec, p.demos, node=node.name)
        )
        for p, row, target in items
    ]
    return Deferred(node.backend, "score", requests, lambda scores: [TargetScore(s.mean) for s in scores])


def posterior_samples(
    node: PlanNode,
    spec: LayerNode,
    params: Params,
    rows: Sequence[Row],
    outputs: Sequence[str],
    child_targets: Sequence[Sequence[tuple[str, str]]],
    train: TrainSpec,
    seed: int,
    proposer: str,
) -> Deferred[list[list[str]]]:
    """K samples per example of what the node should have written, given what its
    children must produce (`child_targets`: per example, (child, target) pairs).
    Per example the candidates are the current output, then the distinct samples.
    Sample k of every example uses the same seed, so identical examples make
    identical requests (sent once). The `proposer` backend writes them."""
    output = spec.output
    shown = demos.text_of(spec, params.demos, node=node.name)
    requests = []
    for row, out, targets in zip(rows, outputs, child_targets):
        text = render_meta(
            "posterior.jinja",
            prompt=params.prompt,
            input=shown_input(spec.template, row, node=node.name),
            output=out,
            targets=[{"node": child, "target": target} for child, target in targets],
            forward=render(spec.template, params.prompt, row, node=node.name, demos=shown),
        )
        requests += [
            GenerateRequest(
                prompt=text,
                max_tokens=output.max_tokens,  # type: ignore[union-attr]
                temperature=train.backward_temperature,
                stop=(*output.stop, "##"),  # type: ignore[union-attr]
                seed=stable_seed(seed, k),
            )
            for k in range(train.posterior_samples)
        ]

    def decode(generations: list[Generation]) -> list[list[str]]:
        k = train.posterior_samples
        out = []
        for index, current in enumerate(outputs):
            candidates = [current]
            for g in generations[index * k : (index + 1) * k]:
                sample = g.texts[0].strip()
                if sample and sample not in candidates:
                    candidates.append(sample)
            out.append(candidates)
        return out

    return Deferred(proposer, "generate", requests, decode)
