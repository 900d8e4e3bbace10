"""A layer whose output is free text (a hidden layer's reasoning, an answer).

Forward renders the template for every example and generates in ONE batched
call. `target_scores` scores given texts as continuations (mean token
log-prob); `posterior_samples` asks the proposer what the node should have
written, given its children's targets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.runtime.backends.base import Backend, GenerateRequest, Generation
from dlngraph.runtime.backward import Deferred, TargetScore, render_meta, shown_input, stable_seed
from dlngraph.runtime.layers.base import ForwardRecord, Params, Posterior, Row
from dlngraph.runtime.layers.prompted import PromptedLayer
from dlngraph.runtime.template import score_request
from dlngraph.spec import TextOutput


class TextLayer(PromptedLayer):
    def __init__(self, plan: ExecutionPlan, name: str, backend: Backend, run_dir: Path | None = None) -> None:
        super().__init__(plan, name, backend)
        assert isinstance(self.spec.output, TextOutput), name
        self.output = self.spec.output

    def forward(self, rows: list[Row], params: Params, *, seed: int = 0) -> ForwardRecord:
        started = time.perf_counter()
        rendered = [self.render(params, row) for row in rows]
        requests = [
            GenerateRequest(
                prompt=text,
                max_tokens=self.output.max_tokens,
                temperature=self.output.temperature,
                stop=tuple(self.output.stop),
                seed=seed,
            )
            for text in rendered
        ]
        generations = self.backend.generate(requests)
        return ForwardRecord(
            node=self.node.name,
            prompt=params.prompt,
            rendered=rendered,
            outputs=[g.texts[0].strip() for g in generations],
            seconds=time.perf_counter() - started,
        )

    # ------------------------------------------------------------------ backward
    # Nothing here calls a model: each method returns the requests (Deferred) so
    # the trainer merges every node of a backward call into one backend call.

    def target_scores(self, items: Sequence[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
        """Mean token log-prob of each (params, row, target text) followed by the output's
        first stop sequence, i.e. of the whole generation including its end. So an empty
        target (end-of-text first) is a scored outcome, not a free log-prob of 0."""
        end = self.output.stop[0] if self.output.stop else ""
        requests = [
            score_request(self.spec.template, p.prompt, row, target + end, node=self.node.name, demos=self.demos_text(p))
            for p, row, target in items
        ]
        return Deferred(self.node.backend, "score", requests, lambda scores: [TargetScore(s.mean) for s in scores])

    def posterior_samples(self, asked: Posterior) -> Deferred[list[list[str]]]:
        """K samples per example of what the node should have written, given what its
        children must produce (`asked.child_targets`).
        Per example the candidates are the current output, then the distinct samples.
        Sample k of every example uses the same seed, so identical examples make
        identical requests (sent once). The node's proposer backend writes them."""
        requests = []
        params, train, outputs = asked.params, asked.train, asked.outputs
        for row, out, targets in zip(asked.rows, outputs, asked.child_targets):
            text = render_meta(
                "posterior.jinja",
                prompt=params.prompt,
                input=shown_input(self.spec.template, row, node=self.node.name),
                output=out,
                targets=[{"node": child, "target": target} for child, target in targets],
                forward=self.render(params, row),
            )
            requests += [
                GenerateRequest(
                    prompt=text,
                    max_tokens=self.output.max_tokens,
                    temperature=train.backward_temperature,
                    stop=(*self.output.stop, "##"),
                    seed=stable_seed(asked.seed, k),
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

        return Deferred(self.node.proposer, "generate", requests, decode)
