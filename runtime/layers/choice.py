"""A layer whose output is one of a fixed set of labels.

Forward scores every choice as a continuation of the rendered prompt and picks
the most likely; its log-probs are normalized over the choices (so they read as
a distribution over labels), then calibrated if the node asks for it (the
label prior divided out, runtime/calibration.py). All examples x all choices go
to the backend in ONE `score` call, with the rendered instruction and
demonstrations as the shared prefix.

Calibration follows the parameters: a `Params` with a fitted prior (`bias`)
uses it; without one, `batch` estimates the prior from the rows scored with the
same parameters (Zhou et al.'s batch calibration, no extra call) and
`contextual` from content-free inputs scored in the same call. So a candidate
prompt or demonstration set is always scored under its own prior.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.runtime import calibration
from dlngraph.runtime.backends.base import Backend, Score
from dlngraph.runtime.backward import Deferred, TargetScore, run_now
from dlngraph.runtime.layers.base import ForwardRecord, Params, Posterior, Row, check_targets
from dlngraph.runtime.layers.prompted import PromptedLayer
from dlngraph.runtime.template import score_request
from dlngraph.spec import ChoiceOutput


class ChoiceLayer(PromptedLayer):
    def __init__(self, plan: ExecutionPlan, name: str, backend: Backend, run_dir: Path | None = None) -> None:
        super().__init__(plan, name, backend)
        assert isinstance(self.spec.output, ChoiceOutput), name
        self.choices = list(self.spec.output.choices)

    def forward(self, rows: list[Row], params: Params, *, seed: int = 0) -> ForwardRecord:
        started = time.perf_counter()
        rendered = [self.render(params, row) for row in rows]
        priors: dict[Params, dict[str, float] | None] = {}
        scored = run_now(self.distributions([(params, row) for row in rows], priors), self.backend)
        # max() keeps the first of tied choices, so ties break by the spec's order.
        outputs = [max(self.choices, key=lambda c: lp[c]) for lp in scored]
        return ForwardRecord(
            node=self.node.name,
            prompt=params.prompt,
            rendered=rendered,
            outputs=outputs,
            choice_logprobs=scored,
            seconds=time.perf_counter() - started,
            # the prior this forward applied: the fit keeps it as the node's fitted bias
            extra={"bias": priors.get(params)} if self.spec.calibration != "none" else {},
        )

    # ------------------------------------------------------------------ backward
    # Nothing here calls a model: each method returns the requests (Deferred) so
    # the trainer merges every node of a backward call into one backend call.

    def distributions(
        self, pairs: Sequence[tuple[Params, Row]], priors: dict[Params, dict[str, float] | None] | None = None
    ) -> Deferred[list[dict[str, float]]]:
        """Every choice of every (params, row) as one score request list, read back as
        class-normalized log-probs, calibrated per the node's `calibration`; the prior
        applied to each distinct Params is written into `priors` when given."""
        node, spec, choices = self.node, self.spec, self.choices
        method = spec.calibration
        distinct = list(dict.fromkeys(p for p, _ in pairs))
        # Content-free rows go after the real ones, per Params that has no fitted prior
        # (unless the rows are the content-free ones: the fit's contextual calibration call).
        free = calibration.content_free_rows(node.inputs + node.parents) if method == "contextual" else []
        extra = [(p, row) for p in distinct if p.bias is None for row in free if (p, row) not in pairs]
        every = [*pairs, *extra]
        requests = [
            score_request(spec.template, p.prompt, row, choice, node=node.name, demos=self.demos_text(p))
            for p, row in every
            for choice in choices
        ]
        priors = {} if priors is None else priors

        def decode(scores: list[Score]) -> list[dict[str, float]]:
            raw = calibration.normalized([s.total for s in scores], choices)
            own = raw[: len(pairs)]
            if method == "none":
                return own
            for p in distinct:
                if p.bias is not None:
                    priors[p] = p.bias_dict()
                elif method == "contextual":
                    priors[p] = calibration.estimate([raw[every.index((p, row))] for row in free])
                else:
                    priors[p] = calibration.estimate([d for (q, _), d in zip(pairs, own) if q == p])
            return [calibration.apply(d, priors[p] or {}) for (p, _), d in zip(pairs, own)]

        return Deferred(node.backend, "score", requests, decode)

    def target_scores(self, items: Sequence[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
        """How likely each (params, row, target) is: the target's class-normalized
        (calibrated) log-prob, with the whole distribution (for trust-region KL and wrong answers)."""
        check_targets((target for _, _, target in items), self.choices, self.node.name)
        inner = self.distributions([(params, row) for params, row, _ in items])

        def decode(scores: list[Score]) -> list[TargetScore]:
            return [TargetScore(lp[target], lp) for (_, _, target), lp in zip(items, inner.decode(scores))]

        return Deferred(self.node.backend, "score", inner.requests, decode)

    def posterior_samples(self, asked: Posterior) -> Deferred[list[list[str]]]:
        """A hidden choice node's posterior candidates are its choices: nothing to sample
        (the plan lists no call for it)."""
        candidates = [[out, *(c for c in self.choices if c != out)] for out in asked.outputs]
        return Deferred(self.node.proposer, "generate", [], lambda _answers: candidates)
