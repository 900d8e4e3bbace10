"""The variational trainer: DLN-1 per node, generalized to DAGs (arXiv 2306.12509).

`Trainer.step` runs one iteration on a mini-batch: a forward over the plan,
then the plan's backward stages in order (reverse topological generations).
Output nodes' targets are the data. A hidden node's targets come from its
posterior: candidates (its current output + K samples for text, every choice
for choice nodes) weighted by softmax((log p(candidate | inputs) + sum over
children of log p(child target | candidate)) / T); the best-weighted candidate
becomes its target, which its parents see in a later stage. A node with several
children sums all their feedback. Every trainable layer then takes a DLN-1
step: N-1 proposals from a meta-prompt plus the current prompt, all N x B
scored, argmax. How a layer's candidates are made and chosen is the
optimizer's (runtime/optimizer.py, a strategy object); the trainer only runs
the stages. Parameter updates apply after the whole backward pass, so every
stage reads the same (current) network. A layer's parameters (`Params`) are its
instruction, its demonstrations and its fitted label prior.

The trainer holds no model logic: the layer modules build the requests
(`Deferred`), and `dispatch` merges a stage's requests into ONE call per
(backend, op, purpose), deduplicated, as the plan's schedule lists them.

The loop around it (evaluation, checkpoints, resume) is `runtime/fit.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from dlngraph.compiler.plan import ExecutionPlan, NodeKind, Stage
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime import demos
from dlngraph.runtime.backward import (
    Attempt,
    Deferred,
    TargetScore,
    posterior_logits,
    posterior_weights,
    shown_input,
    stable_seed,
)
from dlngraph.runtime.data import Example
from dlngraph.runtime.executor import Executor, RunResult
from dlngraph.runtime.layers import choice, text
from dlngraph.runtime.layers.base import Demo, Params, Row
from dlngraph.runtime import metrics
from dlngraph.runtime.optimizer import DLNSearch, Optimizer
from dlngraph.spec import TrainSpec

log = logging.getLogger(__name__)

LAYERS: dict[str, ModuleType] = {"choice": choice, "text": text}
THINK_OP = "think:"
POSTERIOR_EXAMPLES_LOGGED = 3


@dataclass(frozen=True)
class CallRecord:
    """One batched backend call the backward pass made."""

    stage: int
    purpose: str
    backend: str
    op: str
    requests: int


class Events:
    """Progress hooks (the CLI draws bars with them); the default does nothing."""

    def iteration(self, done: int, total: int) -> None: ...

    def call(self, purpose: str, requests: int) -> None: ...


@dataclass
class StepResult:
    params: dict[str, Params]  # after the step (label priors still to be estimated)
    train_acc: float
    loss: dict[str, float]
    accepted: dict[str, bool]
    posteriors: list[dict[str, Any]]
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # proposals filtered, per node and reason

    @property
    def prompts(self) -> dict[str, str]:
        return {n: p.prompt for n, p in self.params.items()}


@dataclass
class Pass:
    """What one backward pass knows: the forward, its rows, and the targets found so far."""

    batch: list[Example]
    indices: list[int]
    result: RunResult
    rows: dict[str, list[Row]]
    targets: dict[str, list[str]]
    posteriors: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        plan: ExecutionPlan,
        backends: Mapping[str, Backend],
        *,
        seed: int,
        layers: Mapping[str, Any] | None = None,
        events: Events | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.plan = plan
        self.backends = backends
        self.seed = seed
        self.layers = dict(layers or {})
        self.events = events or Events()
        self.optimizer: Optimizer = optimizer or DLNSearch()
        self.calls: list[CallRecord] = []
        self.needs_posterior = _needs_posterior(plan)

    @property
    def train(self) -> TrainSpec:
        return self.plan.spec.train

    def parameters(self) -> list[str]:
        """The nodes whose prompt is learned (the one walk that finds them)."""
        return [n for n, node in sorted(self.plan.nodes.items()) if node.kind == NodeKind.LAYER and node.trainable]

    def executor(self, params: Mapping[str, Params] | Mapping[str, str]) -> Executor:
        """An executor with `params` (or plain prompts) overriding the spec's."""
        if all(isinstance(p, Params) for p in params.values()):
            return Executor(self.plan, self.backends, params=params, layers=self.layers, seed=self.seed)  # type: ignore[arg-type]
        return Executor(self.plan, self.backends, params, layers=self.layers, seed=self.seed)  # type: ignore[arg-type]

    def proposer_of(self, name: str) -> str:
        """The backend writing the node's proposals and posterior samples."""
        return self.train.proposer or self.plan.nodes[name].backend

    def demo_pool(self, name: str) -> list[Demo]:
        return demos.pool(self.plan, name)

    # ------------------------------------------------------------------ one iteration

    def step(
        self,
        params: Mapping[str, Params],
        batch: list[Example],
        indices: list[int],
        iteration: int,
        memory: Sequence[Mapping[str, Params]] = (),
    ) -> StepResult:
        executor = self.executor(params)
        result = executor.run(batch)
        # Hidden nodes that are not trained still need their (spec) parameters for re-scoring.
        current = {n: executor.params_of(n) for n, node in self.plan.nodes.items() if node.kind == NodeKind.LAYER}
        state = Pass(
            batch=batch,
            indices=indices,
            result=result,
            rows={name: executor.rows_for(name, batch, result) for name in self.plan.nodes},
            targets={name: [ex[f] for ex in batch] for name, f in self.plan.spec.outputs.items()},
        )
        train_acc = metrics.accuracy(self.plan, [result.outputs(i) for i in range(len(batch))], batch)
        new_params = {n: current[n] for n in self.parameters()}
        loss: dict[str, float] = {}
        accepted: dict[str, bool] = {}
        dropped: dict[str, dict[str, int]] = {}
        for stage in self.plan.backward:
            self.posterior(stage, state, current, iteration)
            for name, selection in self.optimizer.step(self, stage, state, current, iteration, memory).items():
                new_params[name] = selection.candidate
                loss[name] = selection.loss
                accepted[name] = selection.index != 0
                dropped[name] = selection.dropped or {}
        return StepResult(new_params, train_acc, loss, accepted, state.posteriors, dropped)

    def posterior(self, stage: Stage, state: Pass, params: Mapping[str, Params], iteration: int) -> None:
        """Targets for the stage's hidden nodes: sample candidates (one call), then score
        every candidate under the node and under each child (one call), weight, pick."""
        names = [n for n in stage.nodes if self.needs_posterior[n]]
        if not names:
            return
        feedback = {n: self.child_targets(n, state) for n in names}
        sampled = self.dispatch(
            stage,
            "posterior_sampling",
            [
                LAYERS[self.plan.nodes[n].output_type].posterior_samples(
                    self.plan.nodes[n],
                    self.plan.spec.nodes[n],
                    params[n],
                    state.rows[n],
                    state.result.records[n].outputs,
                    feedback[n],
                    self.train,
                    stable_seed(self.seed, iteration, n, "posterior"),
                    self.proposer_of(n),
                )
                for n in names
            ],
        )
        candidates = dict(zip(names, sampled))
        deferred: list[Deferred[list[TargetScore]]] = []
        for n in names:
            # log p(candidate | the node's inputs), then log p(child's target | candidate) per child
            pairs = [(b, h) for b, cands in enumerate(candidates[n]) for h in cands]
            deferred.append(self.score_targets(n, [(params[n], state.rows[n][b], h) for b, h in pairs]))
            for c in self.children_with_targets(n, state):
                # (a Deep-Thinking child has no prompt: its K/V state answers)
                items = [(params.get(c, Params("")), {**state.rows[c][b], n: h}, state.targets[c][b]) for b, h in pairs]
                deferred.append(self.score_targets(c, items))
        scored = iter(self.dispatch(stage, "child_rescoring", deferred))
        for n in names:
            prior = _regroup(next(scored), candidates[n])
            children = self.children_with_targets(n, state)
            child_scores = [_regroup(next(scored), candidates[n]) for _ in children]
            state.targets[n] = []
            for b, cands in enumerate(candidates[n]):
                logits = posterior_logits(
                    [s.logprob for s in prior[b]],
                    [scores[b] for scores in child_scores],
                    [state.targets[c][b] for c in children],
                    self.train.wrong_hidden_penalty,
                )
                weights = posterior_weights(logits, self.train.posterior_temperature)
                chosen = cands[max(range(len(cands)), key=weights.__getitem__)]
                state.targets[n].append(chosen)
                if b < POSTERIOR_EXAMPLES_LOGGED:
                    state.posteriors.append(
                        {
                            "iteration": iteration,
                            "node": n,
                            "example": state.indices[b],
                            "input": shown_input(self.plan.spec.nodes[n].template, state.rows[n][b], node=n),
                            "candidates": [{"text": c, "weight": w} for c, w in zip(cands, weights)],
                            "chosen": chosen,
                        }
                    )

    # ------------------------------------------------------------------ helpers

    def child_targets(self, name: str, state: Pass) -> list[list[tuple[str, str]]]:
        children = self.children_with_targets(name, state)
        return [[(c, state.targets[c][b]) for c in children] for b in range(len(state.batch))]

    def children_with_targets(self, name: str, state: Pass) -> list[str]:
        return [c for c in self.plan.nodes[name].children if c in state.targets]

    def score_targets(self, name: str, items: list[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
        """The node's layer scoring (prompt, row, target) triples."""
        node = self.plan.nodes[name]
        if node.kind == NodeKind.DEEP_THINKING:
            return _thinking_scores(name, node.backend, items)
        return LAYERS[node.output_type].target_scores(node, self.plan.spec.nodes[name], items)

    def attempts(self, name: str, state: Pass) -> list[Attempt]:
        template = self.plan.spec.nodes[name].template
        return [
            Attempt(shown_input(template, row, node=name), output, target)
            for row, output, target in zip(state.rows[name], state.result.records[name].outputs, state.targets[name])
        ]

    def operation(self, backend: str, op: str) -> Callable[[list[Any]], list[Any]]:
        """`generate` / `score` of a backend, or a Deep-Thinking layer's scoring (`think:<node>`)."""
        if op.startswith(THINK_OP):
            layer = self.layers[op.removeprefix(THINK_OP)]
            return lambda rows: layer.choice_logprobs(layer.state, [dict(r) for r in rows])
        return getattr(self.backends[backend], op)

    def dispatch(self, stage: Stage, purpose: str, deferred: Sequence[Deferred[Any]]) -> list[Any]:
        """Run every deferred request list of one purpose: ONE call per (backend, op),
        identical requests sent once; answers go back to each in order."""
        unique: dict[tuple[str, str], dict[Any, int]] = {}
        for d in deferred:
            seen = unique.setdefault((d.backend, d.op), {})
            for request in d.requests:
                seen.setdefault(request, len(seen))
        answers: dict[tuple[str, str], list[Any]] = {}
        for (backend, op), requests in sorted(unique.items()):
            if not requests:
                continue
            self.events.call(purpose, len(requests))
            answers[(backend, op)] = self.operation(backend, op)(list(requests))
            self.calls.append(CallRecord(stage.index, purpose, backend, op, len(requests)))
        return [
            d.decode([answers[(d.backend, d.op)][unique[(d.backend, d.op)][r]] for r in d.requests]) for d in deferred
        ]


# ---------------------------------------------------------------------- small pure helpers


def _needs_posterior(plan: ExecutionPlan) -> dict[str, bool]:
    """Hidden layers whose targets a trainable node (itself or upstream) needs."""
    upstream: dict[str, bool] = {}
    for name in plan.topological_order:
        node = plan.nodes[name]
        upstream[name] = any(plan.nodes[p].trainable or upstream[p] for p in node.parents)
    return {
        name: node.kind == NodeKind.LAYER and not node.is_output and (node.trainable or upstream[name])
        for name, node in plan.nodes.items()
    }


def _thinking_scores(name: str, backend: str, items: list[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
    """A Deep-Thinking node's class-normalized log-prob of each target (it has no prompt:
    its learned K/V state answers), as requests the trainer batches like any other."""
    requests = [tuple(sorted(row.items())) for _, row, _ in items]

    def decode(distributions: list[dict[str, float]]) -> list[TargetScore]:
        return [TargetScore(d[target], d) for d, (_, _, target) in zip(distributions, items)]

    return Deferred(backend, THINK_OP + name, requests, decode)


def _regroup(flat: list[TargetScore], candidates: list[list[str]]) -> list[list[TargetScore]]:
    out, at = [], 0
    for cands in candidates:
        out.append(flat[at : at + len(cands)])
        at += len(cands)
    return out
