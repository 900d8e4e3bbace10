"""The variational trainer: DLN-1 per node, generalized to DAGs (arXiv 2306.12509).

`Trainer.step` runs one iteration on a mini-batch: the plan's forward, then the
plan's backward stages in order (reverse topological generations), CALL BY
CALL: the plan lists every backend call of a stage (`Stage.calls`, the
schedule is the program), and for each call a handler per purpose builds the
requests of the call's nodes from their layers (`Deferred`s) and `send`s them
as that ONE call, identical requests once. The trainer never decides again
which node needs what: the plan node says (`needs_posterior`, `has_targets`,
`trainable`, `proposer`). A stage whose calls were not made exactly as listed
is a `PlanMismatch` (a bug, never a user error).

Output nodes' targets are the data. A hidden node's targets come from its
posterior: candidates (its current output + K samples for text, every choice
for choice nodes) weighted by softmax((log p(candidate | inputs) + sum over
children of log p(child target | candidate)) / T); the best-weighted candidate
becomes its target, which its parents see in a later stage. A node with several
children sums all their feedback. Every trainable layer then takes a step of the
optimizer (runtime/optimizer.py, a strategy object making the stage's
`prompt_proposals` and `candidate_scoring` calls). Parameter updates apply after
the whole backward pass, so every stage reads the same (current) network. A
layer's parameters (`Params`) are its instruction, its demonstrations and its
fitted label prior.

The loop around it (evaluation, checkpoints, resume) is `runtime/fit.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dlngraph.compiler.plan import BatchedCall, ExecutionPlan, Stage
from dlngraph.runtime.backends.base import Backend
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
from dlngraph.runtime.layers import bind
from dlngraph.runtime.layers.base import HiddenLayer, Layer, Params, Posterior, Row
from dlngraph.runtime import metrics
from dlngraph.runtime.optimizer import DLNSearch, Optimizer
from dlngraph.spec import TrainSpec

log = logging.getLogger(__name__)

POSTERIOR_EXAMPLES_LOGGED = 3


class PlanMismatch(AssertionError):
    """The trainer was about to make a call the plan does not list, or left one out: a bug."""


@dataclass(frozen=True)
class MadeCall:
    """One backend call the backward pass made: the plan's call and the nodes whose requests it carried."""

    stage: int
    call: BatchedCall
    nodes: tuple[str, ...]


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
        layers: Mapping[str, Layer] | None = None,
        events: Events | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.plan = plan
        self.backends = backends
        self.seed = seed
        # Every node's layer, bound once (given ones first, e.g. a prepared Deep-Thinking state).
        self.layers: dict[str, Layer] = {
            n: (layers or {}).get(n) or bind(plan, n, backends[node.backend]) for n, node in plan.nodes.items()
        }
        self.events = events or Events()
        self.optimizer: Optimizer = optimizer or DLNSearch()
        self.made: list[MadeCall] = []
        self.current: tuple[int, BatchedCall] | None = None  # the call being sent (context for recorders)

    @property
    def train(self) -> TrainSpec:
        return self.plan.spec.train

    def parameters(self) -> list[str]:
        """The nodes whose prompt is learned (the one walk that finds them)."""
        return [n for n, node in sorted(self.plan.nodes.items()) if node.trainable]

    def executor(self, params: Mapping[str, Params | str]) -> Executor:
        """An executor with `params` (whole parameters, or plain prompts) overriding the spec's."""
        prompts = {n: p for n, p in params.items() if isinstance(p, str)}
        full = {n: p for n, p in params.items() if isinstance(p, Params)}
        return Executor(self.plan, self.backends, prompts, params=full, layers=self.layers, seed=self.seed)

    # ------------------------------------------------------------------ one iteration

    def step(
        self,
        params: Mapping[str, Params | str],
        batch: list[Example],
        indices: list[int],
        iteration: int,
        memory: Sequence[Mapping[str, Params]] = (),
    ) -> StepResult:
        executor = self.executor(params)
        result = executor.run(batch)
        # Nodes that are not trained still need their (spec) parameters for re-scoring.
        current = {n: executor.params_of(n) for n in self.plan.nodes}
        state = Pass(
            batch=batch,
            indices=indices,
            result=result,
            rows={name: executor.rows_for(name, batch, result) for name in self.plan.nodes},
            targets={name: [ex[node.target] for ex in batch] for name, node in self.plan.nodes.items() if node.target},
        )
        train_acc = metrics.accuracy(self.plan, [result.outputs(i) for i in range(len(batch))], batch)
        new_params = {n: current[n] for n in self.parameters()}
        loss: dict[str, float] = {}
        accepted: dict[str, bool] = {}
        dropped: dict[str, dict[str, int]] = {}
        for stage in self.plan.backward:
            made = len(self.made)
            self.posterior(stage, state, current, iteration)
            for name, selection in self.optimizer.step(self, stage, state, current, iteration, memory).items():
                new_params[name] = selection.candidate
                loss[name] = selection.loss
                accepted[name] = selection.index != 0
                dropped[name] = selection.dropped or {}
            sent = [m.call for m in self.made[made:]]
            if sent != list(stage.calls):
                raise PlanMismatch(f"backward stage {stage.index}: made {sent}, the plan lists {list(stage.calls)}")
        return StepResult(new_params, train_acc, loss, accepted, state.posteriors, dropped)

    def posterior(self, stage: Stage, state: Pass, params: Mapping[str, Params], iteration: int) -> None:
        """Targets for the stage's hidden nodes: the plan's posterior-sampling calls, then its
        child-rescoring calls (every candidate under the node and under each child), weight, pick."""
        names = [n for n in stage.nodes if self.plan.nodes[n].needs_posterior]
        if not names:
            return
        sampling = {
            n: self.hidden(n).posterior_samples(
                Posterior(
                    params[n],
                    state.rows[n],
                    state.result.records[n].outputs,
                    [[(c, state.targets[c][b]) for c in self.children_with_targets(n)] for b in range(len(state.batch))],
                    self.train,
                    stable_seed(self.seed, iteration, n, "posterior"),
                )
            )
            for n in names
        }
        candidates: dict[str, list[list[str]]] = self.run_calls(stage, "posterior_sampling", sampling)
        # log p(candidate | the node's inputs), then log p(child's target | candidate) per child
        scoring: dict[tuple[str, str], Deferred[list[TargetScore]]] = {}
        for n in names:
            pairs = [(b, h) for b, cands in enumerate(candidates[n]) for h in cands]
            scoring[(n, n)] = self.layers[n].target_scores([(params[n], state.rows[n][b], h) for b, h in pairs])
            for c in self.children_with_targets(n):
                items = [(params[c], {**state.rows[c][b], n: h}, state.targets[c][b]) for b, h in pairs]
                scoring[(n, c)] = self.layers[c].target_scores(items)
        scored = self.run_calls(stage, "child_rescoring", scoring, by=lambda key: key[1])
        for n in names:
            prior = _regroup(scored[(n, n)], candidates[n])
            children = self.children_with_targets(n)
            child_scores = [_regroup(scored[(n, c)], candidates[n]) for c in children]
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
                            "input": shown_input(self.plan.nodes[n].spec.template, state.rows[n][b], node=n),
                            "candidates": [{"text": c, "weight": w} for c, w in zip(cands, weights)],
                            "chosen": chosen,
                        }
                    )

    # ------------------------------------------------------------------ the plan's calls

    def run_calls(
        self,
        stage: Stage,
        purpose: str,
        deferred: Mapping[Any, Deferred[Any]],
        by: Callable[[Any], str] = lambda key: key,
    ) -> dict[Any, Any]:
        """Make the stage's calls of `purpose`, as the plan lists them: each call sends the
        requests of the `deferred` whose node (`by(key)`) it lists. A deferred that no call
        lists may only be one without requests (e.g. a choice layer's posterior: its choices)."""
        answers: dict[Any, Any] = {}
        for call in stage.calls:
            if call.purpose == purpose:
                keys = [k for k in deferred if by(k) in call.nodes]
                nodes = tuple(sorted({by(k) for k in keys if deferred[k].requests}))
                answers.update(zip(keys, self.send(stage, call, nodes, [deferred[k] for k in keys])))
        for key, d in deferred.items():
            if key not in answers:
                if d.requests:
                    raise PlanMismatch(f"backward stage {stage.index}: no {purpose} call lists {by(key)}")
                answers[key] = d.decode([])
        return answers

    def send(
        self, stage: Stage, call: BatchedCall, nodes: tuple[str, ...], deferred: Sequence[Deferred[Any]]
    ) -> list[Any]:
        """The plan's `call`: every request of `deferred` (of `nodes`) in ONE backend call,
        identical requests sent once; answers go back to each deferred in order."""
        unique: dict[Any, int] = {}
        for d in deferred:
            if (d.backend, d.op) != (call.backend, call.op):
                raise PlanMismatch(f"{d.op} on {d.backend} is not the plan's {call.op} on {call.backend} ({call.purpose})")
            for request in d.requests:
                unique.setdefault(request, len(unique))
        if not unique:
            raise PlanMismatch(f"backward stage {stage.index}: the plan's {call.purpose} call has nothing to send")
        self.events.call(call.purpose, len(unique))
        self.current = (stage.index, call)
        try:
            answers = getattr(self.backends[call.backend], call.op)(list(unique))
        finally:
            self.current = None
        self.made.append(MadeCall(stage.index, call, nodes))
        return [d.decode([answers[unique[r]] for r in d.requests]) for d in deferred]

    # ------------------------------------------------------------------ helpers

    def hidden(self, name: str) -> HiddenLayer:
        layer = self.layers[name]
        if not isinstance(layer, HiddenLayer):
            raise PlanMismatch(f"the plan asks a posterior of {name}, whose layer cannot sample one")
        return layer

    def children_with_targets(self, name: str) -> list[str]:
        return [c for c in self.plan.nodes[name].children if self.plan.nodes[c].has_targets]

    def attempts(self, name: str, state: Pass) -> list[Attempt]:
        template, metric = self.plan.nodes[name].spec.template, self.plan.spec.metric
        return [
            Attempt(shown_input(template, row, node=name), output, target, metrics.is_correct(metric, output, target))
            for row, output, target in zip(state.rows[name], state.result.records[name].outputs, state.targets[name])
        ]


# ---------------------------------------------------------------------- small pure helpers


def _regroup(flat: list[TargetScore], candidates: list[list[str]]) -> list[list[TargetScore]]:
    out, at = [], 0
    for cands in candidates:
        out.append(flat[at : at + len(cands)])
        at += len(cands)
    return out
