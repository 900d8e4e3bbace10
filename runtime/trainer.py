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
scored, argmax. Prompt updates apply after the whole backward pass, so every
stage reads the same (current) network.

The trainer holds no model logic: the layer modules build the requests
(`Deferred`), and `dispatch` merges a stage's requests into ONE call per
(backend, op, purpose), deduplicated, as the plan's schedule lists them.

`Fit` is the loop around it: initial evaluation (iteration 0), mini-batches,
dev evaluation every `eval_every`, best-on-dev selection, early stopping,
checkpoints after every iteration and `--resume`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from dlngraph.compiler.plan import ExecutionPlan, PlanNode, Stage
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import Backend, Usage
from dlngraph.runtime.backward import (
    Attempt,
    Deferred,
    Selection,
    TargetScore,
    posterior_logits,
    posterior_weights,
    proposal_requests,
    rng_for,
    select_candidate,
    shown_input,
    stable_seed,
)
from dlngraph.runtime.data import Example, read_jsonl
from dlngraph.runtime.executor import Executor, RunResult
from dlngraph.runtime.layers import choice, text
from dlngraph.runtime.layers.base import Row
from dlngraph.runtime.metrics import is_correct
from dlngraph.runtime.plot import plot_curve
from dlngraph.runtime.rundir import RunDir
from dlngraph.runtime.tracking import Tracker
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
    prompts: dict[str, str]  # after the step
    train_acc: float
    loss: dict[str, float]
    accepted: dict[str, bool]
    posteriors: list[dict[str, Any]]


@dataclass
class _Pass:
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
    ) -> None:
        self.plan = plan
        self.backends = backends
        self.seed = seed
        self.layers = dict(layers or {})
        self.events = events or Events()
        self.calls: list[CallRecord] = []
        self.needs_posterior = _needs_posterior(plan)

    @property
    def train(self) -> TrainSpec:
        return self.plan.spec.train

    def parameters(self) -> list[str]:
        """The nodes whose prompt is learned (the one walk that finds them)."""
        return [n for n, node in sorted(self.plan.nodes.items()) if node.kind == "layer" and node.trainable]

    def executor(self, prompts: Mapping[str, str]) -> Executor:
        return Executor(self.plan, self.backends, prompts, layers=self.layers, seed=self.seed)

    # ------------------------------------------------------------------ one iteration

    def step(self, prompts: Mapping[str, str], batch: list[Example], indices: list[int], iteration: int) -> StepResult:
        executor = self.executor(prompts)
        result = executor.run(batch)
        # Hidden nodes that are not trained still need their (spec) prompt for re-scoring.
        prompts = {n: executor.prompt_of(n) for n, node in self.plan.nodes.items() if node.kind == "layer"}
        state = _Pass(
            batch=batch,
            indices=indices,
            result=result,
            rows={name: executor.rows_for(name, batch, result) for name in self.plan.nodes},
            targets={name: [ex[f] for ex in batch] for name, f in self.plan.spec.outputs.items()},
        )
        train_acc = _accuracy(self.plan, [result.outputs(i) for i in range(len(batch))], batch)
        new_prompts = {n: prompts[n] for n in self.parameters()}
        loss: dict[str, float] = {}
        accepted: dict[str, bool] = {}
        for stage in self.plan.backward:
            self.posterior(stage, state, prompts, iteration)
            for name, selection in self.prompt_step(stage, state, prompts, iteration).items():
                new_prompts[name] = selection.prompt
                loss[name] = selection.loss
                accepted[name] = selection.index != 0
        return StepResult(new_prompts, train_acc, loss, accepted, state.posteriors)

    def posterior(self, stage: Stage, state: _Pass, prompts: Mapping[str, str], iteration: int) -> None:
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
                    prompts[n],
                    state.rows[n],
                    state.result.records[n].outputs,
                    feedback[n],
                    self.train,
                    stable_seed(self.seed, iteration, n, "posterior"),
                )
                for n in names
            ],
        )
        candidates = dict(zip(names, sampled))
        deferred: list[Deferred[list[TargetScore]]] = []
        for n in names:
            # log p(candidate | the node's inputs), then log p(child's target | candidate) per child
            pairs = [(b, h) for b, cands in enumerate(candidates[n]) for h in cands]
            deferred.append(self.score_targets(n, [(prompts[n], state.rows[n][b], h) for b, h in pairs]))
            for c in self.children_with_targets(n, state):
                # (a Deep-Thinking child has no prompt: its K/V state answers)
                items = [(prompts.get(c, ""), {**state.rows[c][b], n: h}, state.targets[c][b]) for b, h in pairs]
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

    def prompt_step(
        self, stage: Stage, state: _Pass, prompts: Mapping[str, str], iteration: int
    ) -> dict[str, Selection]:
        """DLN-1 for the stage's trainable layers: proposals (one call), N x B scoring (one call), argmax."""
        names = [n for n in stage.nodes if n in self.parameters() and n in state.targets]
        if not names:
            return {}
        proposals = self.dispatch(
            stage,
            "prompt_proposals",
            [
                proposal_requests(
                    self.plan.nodes[n].backend,
                    prompts[n],
                    self.attempts(n, state),
                    self.train,
                    rng_for(self.seed, iteration, f"meta-examples/{n}"),
                    stable_seed(self.seed, iteration, n, "proposals"),
                )
                for n in names
            ],
        )
        candidates = dict(zip(names, proposals))
        trust_text = self.train.trust_region > 0
        deferred = []
        for n in names:
            rows, targets = state.rows[n], state.targets[n]
            items = [(p, row, t) for p in candidates[n] for row, t in zip(rows, targets)]
            deferred.append(self.score_targets(n, items))
            if trust_text and self.plan.nodes[n].output_type == "text":
                outputs = state.result.records[n].outputs
                deferred.append(self.score_targets(n, [(p, r, o) for p in candidates[n] for r, o in zip(rows, outputs)]))
        scored = iter(self.dispatch(stage, "candidate_scoring", deferred))
        selections = {}
        for n in names:
            b = len(state.batch)
            per_candidate = _chunks(next(scored), b)
            current = _chunks(next(scored), b) if trust_text and self.plan.nodes[n].output_type == "text" else None
            selections[n] = select_candidate(candidates[n], per_candidate, self.train.trust_region, current)
            log.info("iteration %d %s: candidate %d of %d (objective %s)", iteration, n, selections[n].index,
                     len(candidates[n]), [round(x, 3) for x in selections[n].objective])
        return selections

    # ------------------------------------------------------------------ helpers

    def child_targets(self, name: str, state: _Pass) -> list[list[tuple[str, str]]]:
        children = self.children_with_targets(name, state)
        return [[(c, state.targets[c][b]) for c in children] for b in range(len(state.batch))]

    def children_with_targets(self, name: str, state: _Pass) -> list[str]:
        return [c for c in self.plan.nodes[name].children if c in state.targets]

    def score_targets(self, name: str, items: list[tuple[str, Row, str]]) -> Deferred[list[TargetScore]]:
        """The node's layer scoring (prompt, row, target) triples."""
        node = self.plan.nodes[name]
        if node.kind == "deep_thinking":
            return _thinking_scores(name, node.backend, items)
        return LAYERS[node.output_type].target_scores(node, self.plan.spec.nodes[name], items)

    def attempts(self, name: str, state: _Pass) -> list[Attempt]:
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


# ---------------------------------------------------------------------- the fit loop


@dataclass
class FitResult:
    run_dir: RunDir
    prompts: dict[str, str]  # the last iteration's
    best: dict[str, Any]  # {"iteration", "dev_acc", "prompts"}
    iterations: int  # completed
    stopped_early: bool


class Fit:
    """The training loop over a run directory; see the module docstring."""

    def __init__(
        self,
        plan: ExecutionPlan,
        backends: Mapping[str, Backend],
        run: RunDir,
        *,
        seed: int | None = None,
        iterations: int | None = None,
        events: Events | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.plan = plan
        self.backends = backends
        self.run = run
        self.seed = plan.spec.train.seed if seed is None else seed
        trainable = any(n.kind == "layer" and n.trainable for n in plan.nodes.values())
        self.iterations = (plan.spec.train.iterations if iterations is None else iterations) if trainable else 0
        self.events = events or Events()
        self.tracker = tracker or Tracker()
        self.trainer: Trainer | None = None

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        path = self.plan.data_paths.get(split)
        if path is None:
            return []
        fields = [*self.plan.spec.inputs, *sorted(set(self.plan.spec.outputs.values()))]
        return read_jsonl(path, fields, limit=limit)

    def run_fit(self, resume: bool = False) -> FitResult:
        state = self.run.last_checkpoint() if resume else None
        if state is not None:
            self.seed = state["seed"]
            self.run.truncate_after(state["iteration"])
        train_set, dev_set = self.examples("train"), self.examples("dev", self.plan.spec.train.dev_size)
        layers = self.think(dev_set)
        self.trainer = Trainer(self.plan, self.backends, seed=self.seed, layers=layers, events=self.events)
        if state is None:
            state = self.initial(dev_set)
        stopped = state["early_stop"]["stopped"]
        try:
            while not stopped and state["iteration"] < self.iterations:
                self.events.iteration(state["iteration"], self.iterations)
                state = self.iteration(state, train_set, dev_set)
                stopped = state["early_stop"]["stopped"]
        except KeyboardInterrupt:
            log.warning("interrupted: the last checkpoint is iteration %d", state["iteration"])
            raise
        self.events.iteration(state["iteration"], self.iterations)
        self.finish(state, dev_set)
        return FitResult(self.run, state["prompts"], state["best"], state["iteration"], stopped)

    def think(self, dev_set: list[Example]) -> dict[str, Any]:
        """Deep-Thinking nodes tune their K/V state once (saved in the run dir, loaded on
        resume); they are not prompt-trained. A node reading upstream nodes selects T on
        dev rows holding their outputs under the spec's prompts."""
        layers: dict[str, Any] = {}
        for name in self.plan.topological_order:
            node = self.plan.nodes[name]
            if node.kind != "deep_thinking":
                continue
            from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer

            layer = DeepThinkingLayer.from_plan(self.plan, name, self.backends[node.backend], run_dir=self.run.path)
            self.events.call("think", 1)
            if node.parents and dev_set:
                executor = Executor(self.plan, self.backends, layers=layers, seed=self.seed)
                upstream = RunResult(records={})
                for stage in self.plan.forward:
                    if name in stage.nodes:
                        break
                    executor.run_stage(stage, dev_set, upstream)
                rows = executor.rows_for(name, dev_set, upstream)
                layer.prepare(dev_rows=rows, dev_targets=[ex[self.plan.spec.outputs.get(name, layer.spec.label_field)] for ex in dev_set])
            else:
                layer.prepare()
            layers[name] = layer
        return layers

    def initial(self, dev_set: list[Example]) -> dict[str, Any]:
        """Iteration 0: the spec's prompts evaluated on dev; they are the first best."""
        started, before = time.perf_counter(), self.usage()
        prompts = {n: self.plan.spec.nodes[n].prompt for n in self.trainer.parameters()}  # type: ignore[union-attr]
        dev_acc, predictions = self.evaluate(prompts, dev_set)
        self.run.write_predictions("initial", predictions)
        best = {"iteration": 0, "dev_acc": dev_acc, "prompts": dict(prompts)}
        state = self.state(0, prompts, best, 0, False)
        self.record(0, None, dev_acc, {}, {}, [], before, started)
        self.commit(state)
        return state

    def iteration(self, state: dict[str, Any], train_set: list[Example], dev_set: list[Example]) -> dict[str, Any]:
        iteration = state["iteration"] + 1
        started, before = time.perf_counter(), self.usage()
        rng = rng_for(self.seed, iteration, "batch")
        indices = sorted(rng.sample(range(len(train_set)), min(self.plan.spec.train.batch_size, len(train_set))))
        assert self.trainer is not None
        step = self.trainer.step(state["prompts"], [train_set[i] for i in indices], indices, iteration)
        best, patience_used = state["best"], state["early_stop"]["evaluations_without_gain"]
        dev_acc = None
        if dev_set and (iteration % self.plan.spec.train.eval_every == 0 or iteration == self.iterations):
            dev_acc, _ = self.evaluate(step.prompts, dev_set)
            if dev_acc > best["dev_acc"]:
                best, patience_used = {"iteration": iteration, "dev_acc": dev_acc, "prompts": dict(step.prompts)}, 0
            else:
                patience_used += 1
        elif not dev_set:  # nothing to select on: the latest prompts are the result
            best = {"iteration": iteration, "dev_acc": None, "prompts": dict(step.prompts)}
        stopped = patience_used >= self.plan.spec.train.patience
        self.record(iteration, step.train_acc, dev_acc, step.loss, step.accepted, step.posteriors, before, started)
        new_state = self.state(iteration, step.prompts, best, patience_used, stopped)
        self.commit(new_state)
        if stopped:
            log.info("early stop after %d evaluations without gain", patience_used)
        return new_state

    def state(self, iteration: int, prompts: dict[str, str], best: dict[str, Any], without_gain: int, stopped: bool) -> dict[str, Any]:
        """A checkpoint: all resume needs, as plain data. Random draws are derived from
        (seed, iteration, purpose), so the seed and the iteration are the whole RNG state."""
        return {
            "iteration": iteration,
            "seed": self.seed,
            "prompts": dict(prompts),
            "best": best,
            "early_stop": {"evaluations_without_gain": without_gain, "stopped": stopped},
            "rng": {"scheme": "sha256(seed, iteration, purpose)", "seed": self.seed, "next_iteration": iteration + 1},
        }

    def commit(self, state: dict[str, Any]) -> None:
        # The checkpoint goes last: a run killed before it repeats the iteration on resume.
        self.run.save_best(state["best"])
        self.run.save_checkpoint(state)

    def record(
        self,
        iteration: int,
        train_acc: float | None,
        dev_acc: float | None,
        loss: dict[str, float],
        accepted: dict[str, bool],
        posteriors: list[dict[str, Any]],
        before: Usage,
        started: float,
    ) -> None:
        spent = self.usage() - before
        metrics = {
            "iteration": iteration,
            "train_acc": train_acc,
            "dev_acc": dev_acc,
            "loss": loss,
            "accepted": accepted,
            "calls": spent.calls,
            "requests": spent.requests,
            "prompt_tokens": spent.prompt_tokens,
            "completion_tokens": spent.completion_tokens,
            "cost": spent.cost,
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.run.append(self.run.metrics, [metrics])
        self.run.append(self.run.posteriors, posteriors)
        self.tracker.log_metrics(iteration, metrics)
        log.info("iteration %d: train %s dev %s accepted %s", iteration, train_acc, dev_acc, accepted)

    def usage(self) -> Usage:
        total = Usage()
        for backend in self.backends.values():
            total.add(backend.usage)
        return total

    def evaluate(self, prompts: Mapping[str, str], examples: list[Example]) -> tuple[float, list[dict[str, Any]]]:
        """Accuracy of the output nodes on `examples` (one batched call per node) and predictions."""
        if not examples:
            return 0.0, []
        assert self.trainer is not None
        result = self.trainer.executor(prompts).run(examples)
        outputs = [result.outputs(i) for i in range(len(examples))]
        rows = [_prediction(self.plan, i, ex, out) for i, (ex, out) in enumerate(zip(examples, outputs))]
        return _accuracy(self.plan, outputs, examples), rows

    def finish(self, state: dict[str, Any], dev_set: list[Example]) -> None:
        _, predictions = self.evaluate(state["best"]["prompts"], dev_set)
        self.run.write_predictions("best", predictions)
        plot_curve(self.run.read(self.run.metrics), self.run.curve, self.plan.name)


# ---------------------------------------------------------------------- small pure helpers


def _needs_posterior(plan: ExecutionPlan) -> dict[str, bool]:
    """Hidden layers whose targets a trainable node (itself or upstream) needs."""
    upstream: dict[str, bool] = {}
    for name in plan.topological_order:
        node = plan.nodes[name]
        upstream[name] = any(plan.nodes[p].trainable or upstream[p] for p in node.parents)
    return {
        name: node.kind == "layer" and not node.is_output and (node.trainable or upstream[name])
        for name, node in plan.nodes.items()
    }


def _thinking_scores(name: str, backend: str, items: list[tuple[str, Row, str]]) -> Deferred[list[TargetScore]]:
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


def _chunks(flat: list[TargetScore], size: int) -> list[list[TargetScore]]:
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def _correct(plan: ExecutionPlan, outputs: Mapping[str, str], example: Example) -> bool:
    return all(is_correct(plan.spec.metric, outputs[n], example[f]) for n, f in plan.spec.outputs.items())


def _accuracy(plan: ExecutionPlan, outputs: Sequence[Mapping[str, str]], examples: Sequence[Example]) -> float:
    if not examples:
        return 0.0
    return sum(_correct(plan, out, ex) for out, ex in zip(outputs, examples)) / len(examples)


def _prediction(plan: ExecutionPlan, index: int, example: Example, outputs: Mapping[str, str]) -> dict[str, Any]:
    """A predictions line: {"index", "input", "target", "prediction", "correct"}; with
    several inputs or outputs the fields hold {name: value} mappings."""
    spec = plan.spec

    def one_or_all(values: dict[str, str]) -> str | dict[str, str]:
        return next(iter(values.values())) if len(values) == 1 else values

    return {
        "index": index,
        "input": one_or_all({f: example[f] for f in spec.inputs}),
        "target": one_or_all({n: example[f] for n, f in sorted(spec.outputs.items())}),
        "prediction": one_or_all({n: outputs[n] for n in sorted(spec.outputs)}),
        "correct": _correct(plan, outputs, example),
    }
