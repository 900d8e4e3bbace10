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
from dlngraph.runtime.backends.base import Backend, Score
from dlngraph.runtime.backward import Deferred, TargetScore, run_now
from dlngraph.runtime.layers.base import ForwardRecord, Row
from dlngraph.runtime.template import render, score_request
from dlngraph.spec import LayerNode, TrainSpec


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
    return run_now(distributions(node, spec, pairs), backend)


def target_logprobs(
    node: PlanNode, spec: LayerNode, backend: Backend, items: Sequence[tuple[str, Row, str]]
) -> list[float]:
    """Class-normalized log-prob of each (prompt, row, target) in one score call,
    so N candidate prompts x B examples cost one batched backend call."""
    return [s.logprob for s in run_now(target_scores(node, spec, items), backend)]


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


# ---------------------------------------------------------------------- backward
# Nothing here calls a model: each function returns the requests (Deferred) so
# the trainer merges every node of a backward stage into one call per backend.


def distributions(node: PlanNode, spec: LayerNode, pairs: Sequence[tuple[str, Row]]) -> Deferred[list[dict[str, float]]]:
    """Every choice of every (prompt, row) as one score request list, read back as
    class-normalized log-probs (the instruction is the shared prefix)."""
    choices = list(spec.output.choices)  # type: ignore[union-attr]
    requests = [
        score_request(spec.template, prompt, row, choice, node=node.name) for prompt, row in pairs for choice in choices
    ]

    def decode(scores: list[Score]) -> list[dict[str, float]]:
        out = []
        for start in range(0, len(scores), len(choices)):
            totals = [s.total for s in scores[start : start + len(choices)]]
            norm = _logsumexp(totals)
            out.append({c: t - norm for c, t in zip(choices, totals)})
        return out

    return Deferred(node.backend, "score", requests, decode)


def target_scores(
    node: PlanNode, spec: LayerNode, items: Sequence[tuple[str, Row, str]]
) -> Deferred[list[TargetScore]]:
    """How likely each (prompt, row, target) is: the target's class-normalized
    log-prob, with the whole distribution (for trust-region KL and wrong answers)."""
    choices = set(spec.output.choices)  # type: ignore[union-attr]
    unknown = sorted({target for _, _, target in items} - choices)
    if unknown:
        raise RuntimeFailure(
            f"target {unknown[0]!r} is not one of the choices {sorted(choices)}",
            node=node.name,
            hint="the dataset's labels must be spelled exactly like the node's choices",
        )
    inner = distributions(node, spec, [(prompt, row) for prompt, row, _ in items])

    def decode(scores: list[Score]) -> list[TargetScore]:
        return [TargetScore(lp[target], lp) for (_, _, target), lp in zip(items, inner.decode(scores))]

    return Deferred(node.backend, "score", inner.requests, decode)


def posterior_samples(
    node: PlanNode,
    spec: LayerNode,
    prompt: str,
    rows: Sequence[Row],
    outputs: Sequence[str],
    child_targets: Sequence[Sequence[tuple[str, str]]],
    train: TrainSpec,
    seed: int,
) -> Deferred[list[list[str]]]:
    """A hidden choice node's posterior candidates are its choices: nothing to sample.
    (The current output comes first, as for text nodes.)"""
    choices = list(spec.output.choices)  # type: ignore[union-attr]
    candidates = [[out, *(c for c in choices if c != out)] for out in outputs]
    return Deferred(node.backend, "generate", [], lambda _answers: candidates)
