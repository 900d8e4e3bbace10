"""Pass 8, schedule: the checked graph -> an `ExecutionPlan`.

REQUIRES "acyclic", "capable", "data_checked". GUARANTEES "planned".

- think: one stage with every deep_thinking node's one-time K/V tuning over
  its demonstrations (and, without a fixed `steps`, the dev scoring that picks T).
- forward: networkx topological generations, names sorted within a stage;
  one batched call per node, sized for one training batch (`batch_size`).
- backward: the generations reversed; per stage exactly the calls the trainer
  makes, merged per (backend, op, purpose) and executed by it call by call:
  for hidden layers whose targets something trainable needs (`needs_posterior`),
  posterior sampling (B x K, text layers; a choice layer's candidates are its
  choices) and child re-scoring (every candidate under the node itself and under
  each child that has targets); for trainable layers prompt proposals (N - 1)
  and candidate scoring (N x B, twice for a text layer under a trust region;
  N x (B + 3) for a contextually calibrated choice layer: each candidate's prior).
- evaluation: one forward over `dev_size` dev examples (all of dev if unset),
  run before training, every `eval_every` iterations and after the last.
- calibration: the label priors of the trainable calibrated choice layers,
  estimated before the first evaluation and after every iteration (a step
  leaves them unknown): the batch-calibrated layers and their ancestors (whose
  outputs they read) as a forward over `calibration_size` unlabeled train
  inputs, in topological stages (a contextually calibrated layer among them
  scores the content-free inputs in the same call); then, in one last stage,
  every other contextually calibrated layer over the content-free inputs alone
  (its parents read them too, so none of its ancestors runs).
- candidate scoring counts every candidate: the current parameters, N - 1
  proposals, the dev memory and, for layers with demonstrations, the
  demonstration sets tried; demonstrations count in every request's prompt.

A call's `op` and `requests` are what the runtime sends through the backend
interface (`generate` / `score`); its tokens are what the model reads and writes
(a top-logprobs backend answers a choice's score requests with one generated
token per example). Token counts are estimates: characters / 4, with mean field lengths from the
data pass (64 tokens per field without data) and `max_tokens` for generated
text (an upper bound).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import networkx as nx

from dlngraph.capabilities import Capability
from dlngraph.errors import SpecError
from dlngraph.spec import CONTENT_FREE_INPUTS, DeepThinkingNode, LayerNode, Spec

from dlngraph.compiler import templates
from dlngraph.compiler.ir import FieldProfile, NodeKind, Unit, nodes
from dlngraph.compiler.plan import BatchedCall, ExecutionPlan, PlanNode, Stage

REQUIRES = frozenset({"acyclic", "capable", "data_checked"})
GUARANTEES = frozenset({"planned"})

CHARS_PER_TOKEN = 4
DEFAULT_FIELD_TOKENS = 64
META_PROMPT_OVERHEAD_TOKENS = 120  # instructions of a proposal / posterior meta-prompt


def tokens(chars: float) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def run(unit: Unit) -> Unit:
    assert unit.spec is not None and unit.graph is not None and unit.profiles is not None
    graph, spec = unit.graph, unit.spec
    generations = [tuple(sorted(g)) for g in nx.topological_generations(graph)]
    needs = _needs_posterior(nodes(graph), generations)
    # What this pass decides about each node goes on the node, where the runtime reads it.
    data = {
        name: replace(
            d,
            children=tuple(sorted(graph.successors(name))),
            proposer=(spec.train.proposer or d.backend) if d.trainable or needs[name] else "",
            needs_posterior=needs[name],
        )
        for name, d in nodes(graph).items()
    }
    sizes = _Sizes(spec, data, unit.profiles, unit.capabilities)
    _check_demonstrations(spec, data, unit)
    train = spec.train
    forward = tuple(Stage(i, g, tuple(sizes.forward(data[n], train.batch_size) for n in g)) for i, g in enumerate(generations))
    backward = tuple(
        Stage(i, g, _merge(call for n in g for call in _backward_calls(data[n], needs, graph, sizes, spec)))
        for i, g in enumerate(reversed(generations))
    )
    dev_rows = _dev_rows(spec, unit.profiles)
    evaluation = (
        tuple(Stage(i, g, tuple(sizes.forward(data[n], dev_rows) for n in g)) for i, g in enumerate(generations))
        if dev_rows
        else ()
    )
    think = _think(data, sizes, dev_rows)
    plan = ExecutionPlan(
        spec=spec,
        spec_path=unit.path.resolve(),
        nodes=data,
        think=think,
        forward=forward,
        backward=backward,
        data_paths={split: p.path for split, p in sorted(unit.profiles.items())},
        evaluation=evaluation,
        calibration=_calibration(data, graph, generations, sizes),
        spec_sha256=hashlib.sha256(unit.source.text.encode() if unit.source else b"").hexdigest(),
    )
    return replace(unit, plan=plan)


@dataclass
class _Sizes:
    """Per-request token sizes of each node, from the spec and the data profile."""

    spec: Spec
    data: dict[str, PlanNode]
    profiles: dict[str, FieldProfile]
    capabilities: dict[str, frozenset[Capability]]
    _prompts: dict[str, int] = field(default_factory=dict)  # node -> tokens, computed once
    _outputs: dict[str, int] = field(default_factory=dict)

    def field(self, name: str, split: str = "train") -> int:
        profile = self.profiles.get(split) or next(iter(self.profiles.values()), None)
        if profile is None or name not in profile.mean_chars:
            return DEFAULT_FIELD_TOKENS
        return tokens(profile.mean_chars[name])

    def output(self, d: PlanNode) -> int:
        """Tokens of one output: generated text (max_tokens) or the mean choice."""
        known = self._outputs.get(d.name)
        if known is None:
            if d.output_type == "text":
                known = d.spec.output.max_tokens
            else:
                known = math.ceil(sum(tokens(len(c)) for c in d.choices) / len(d.choices))
            self._outputs[d.name] = known
        return known

    def prompt(self, d: PlanNode) -> int:
        """Tokens of one rendered request of the node (query template for deep_thinking)."""
        known = self._prompts.get(d.name)
        if known is None:
            own = tokens(len(d.spec.template)) + (tokens(len(d.spec.prompt)) if isinstance(d.spec, LayerNode) else 0)
            reads = sum(self.field(f) for f in d.inputs) + sum(self.output(self.data[p]) for p in d.parents)
            known = self._prompts[d.name] = own + reads + self.demos(d)
        return known

    def demos(self, d: PlanNode) -> int:
        """Tokens of the node's demonstrations (all k): each its template, the fields it reads, a label."""
        shown = getattr(d.spec, "demos", None)
        if shown is None:
            return 0
        read = templates.variables(shown.template) - {"label"}
        one = tokens(len(shown.template) + len(shown.separator)) + sum(self.field(f) for f in sorted(read)) + self.output(d)
        return shown.count * one

    def candidates(self, d: PlanNode) -> int:
        """Candidates a trainable layer scores per step (see the module docstring)."""
        train = self.spec.train
        shown = getattr(d.spec, "demos", None)
        searched = shown is not None and shown.search
        return train.prompt_proposals + train.memory + (train.demo_candidates if searched else 0)

    def scores(self, d: PlanNode) -> bool:
        return d.output_type == "text" or Capability.SCORE in self.capabilities[d.backend]

    def forward(self, d: PlanNode, examples: int, purpose: str = "forward") -> BatchedCall:
        """The node's forward over `examples` examples as one batched call."""
        p = self.prompt(d)
        if d.output_type == "text":
            return BatchedCall("generate", purpose, d.backend, (d.name,), examples, examples * p, examples * self.output(d))
        n = examples * len(d.choices)
        if not self.scores(d):  # top-logprobs: the backend asks one generated token per example
            return BatchedCall("score", purpose, d.backend, (d.name,), n, examples * p, examples)
        return BatchedCall("score", purpose, d.backend, (d.name,), n, n * p, examples * sum(tokens(len(c)) for c in d.choices))

    def score_targets(self, d: PlanNode, count: int, purpose: str, target_tokens: int) -> BatchedCall:
        """Scoring `count` targets under node `d` (all choices of each, for a choice node)."""
        per = 1 if d.output_type == "text" else len(d.choices)
        return BatchedCall("score", purpose, d.backend, (d.name,), count * per, count * per * self.prompt(d), count * per * target_tokens)


def _needs_posterior(data: dict[str, PlanNode], generations: list[tuple[str, ...]]) -> dict[str, bool]:
    """Node -> whether it is a hidden layer whose targets a trainable node (itself or
    upstream) needs (one pass in topological order). The trainer reads this, never decides it."""
    upstream: dict[str, bool] = {}
    for generation in generations:
        for name in generation:
            upstream[name] = any(data[p].trainable or upstream[p] for p in data[name].parents)
    return {
        name: d.kind is NodeKind.LAYER and d.target is None and (d.trainable or upstream[name])
        for name, d in data.items()
    }


def _calibration(
    data: dict[str, PlanNode], graph: nx.DiGraph, generations: list[tuple[str, ...]], sizes: _Sizes
) -> tuple[Stage, ...]:
    """The stages of one label-prior estimate (see the module docstring)."""
    fitted = {n for n, d in data.items() if d.fits_prior}
    batch = {n for n in fitted if data[n].calibration == "batch"}
    needed = batch.union(*(nx.ancestors(graph, n) for n in batch))
    rows = sizes.spec.train.calibration_size
    free = len(CONTENT_FREE_INPUTS)
    stages = [
        tuple(
            replace(sizes.forward(data[n], rows + (free if n in fitted - batch else 0)), purpose="calibration")
            for n in g
            if n in needed
        )
        for g in generations
    ]
    alone = sorted(fitted - needed)  # contextual, read by no batch-calibrated layer
    stages.append(tuple(replace(sizes.forward(data[n], free), purpose="content_free_calibration") for n in alone))
    return tuple(Stage(i, tuple(n for c in calls for n in c.nodes), calls) for i, calls in enumerate(c for c in stages if c))


def _backward_calls(
    d: PlanNode, needs: dict[str, bool], graph: nx.DiGraph, sizes: _Sizes, spec: Spec
) -> list[BatchedCall]:
    """The node's share of its backward stage, as the trainer makes it: posterior
    sampling (hidden text layers), scoring every candidate under the node itself and
    under each child that has targets, proposals and candidate scoring (trainable)."""
    train = spec.train
    b, k, n = train.batch_size, train.posterior_samples, train.prompt_proposals
    calls: list[BatchedCall] = []
    if needs[d.name]:
        # per example: the current output and K samples (text), or every choice
        candidates = k + 1 if d.output_type == "text" else len(d.choices)
        if d.output_type == "text":
            children_targets = sum(sizes.output(sizes.data[c]) for c in graph.successors(d.name))
            p = sizes.prompt(d) + children_targets + META_PROMPT_OVERHEAD_TOKENS
            calls.append(BatchedCall("generate", "posterior_sampling", d.proposer, (d.name,), b * k, b * k * p, b * k * sizes.output(d)))
        calls.append(sizes.score_targets(d, b * candidates, "child_rescoring", sizes.output(d)))
        for child in sorted(graph.successors(d.name)):
            c = sizes.data[child]
            if c.target is not None or needs[child]:
                calls.append(sizes.score_targets(c, b * candidates, "child_rescoring", sizes.output(c)))
    if d.trainable:
        meta = (
            META_PROMPT_OVERHEAD_TOKENS
            + tokens(len(d.spec.prompt))
            + train.meta_examples * (sizes.prompt(d) - sizes.demos(d) + sizes.output(d))  # inputs shown without demos
        )
        if n > 1:
            calls.append(BatchedCall("generate", "prompt_proposals", d.proposer, (d.name,), n - 1, (n - 1) * meta, (n - 1) * train.proposal_max_tokens))
        # a text layer under a trust region also scores its current outputs under every candidate;
        # a contextually calibrated choice layer scores the content-free inputs under each (its prior)
        scored = 2 if train.trust_region > 0 and d.output_type == "text" else 1
        free = len(CONTENT_FREE_INPUTS) if d.fits_prior and d.calibration == "contextual" else 0
        calls.append(sizes.score_targets(d, sizes.candidates(d) * (scored * b + free), "candidate_scoring", sizes.output(d)))
    return calls


def _merge(calls) -> tuple[BatchedCall, ...]:
    """One call per (backend, op, purpose): the trainer can batch a stage's requests together."""
    groups: dict[tuple[str, str, str], list[BatchedCall]] = defaultdict(list)
    for call in calls:
        groups[(call.backend, call.op, call.purpose)].append(call)
    return tuple(
        BatchedCall(
            op=op,
            purpose=purpose,
            backend=backend,
            nodes=tuple(sorted({n for c in group for n in c.nodes})),
            requests=sum(c.requests for c in group),
            prompt_tokens=sum(c.prompt_tokens for c in group),
            completion_tokens=sum(c.completion_tokens for c in group),
        )
        for (backend, op, purpose), group in sorted(groups.items(), key=lambda kv: (_ORDER[kv[0][2]], kv[0]))
    )


_ORDER = {"posterior_sampling": 0, "child_rescoring": 1, "prompt_proposals": 2, "candidate_scoring": 3}


def _check_demonstrations(spec: Spec, data: dict[str, PlanNode], unit: Unit) -> None:
    """k demonstrations must exist in the train split (never dev or test)."""
    assert unit.source is not None and unit.profiles is not None
    train = unit.profiles.get("train")
    problems = []
    for name, d in sorted(data.items()):
        shown = getattr(d.spec, "demos", None)
        if shown is None or shown.examples is not None:
            continue
        rows = train.rows if train is not None else 0
        if shown.count > rows:
            problems.append(unit.source.diagnostic(
                "E507",
                f"{shown.count} demonstrations asked, but the train split has {rows} example(s)"
                if train is not None else f"{shown.count} demonstrations asked, but the spec has no train split",
                unit.source.value_span(("nodes", name, "demos", "count")),
                node=name,
                hint="demonstrations are drawn from train only (never dev or test): lower `demos.count`, "
                "add train examples under `data.train`, or list fixed `examples:`",
            ))  # fmt: skip
    if problems:
        raise SpecError(problems)


def _think(data: dict[str, PlanNode], sizes: _Sizes, dev_rows: int) -> tuple[Stage, ...]:
    thinkers = [(d, d.spec) for d in data.values() if isinstance(d.spec, DeepThinkingNode)]
    if not thinkers:
        return ()
    calls = []
    for d, spec in thinkers:
        steps = spec.steps or spec.max_steps
        count = len(spec.demonstrations.examples) if spec.demonstrations.examples else spec.demonstrations.count
        read = templates.variables(spec.demo_template)
        demo = tokens(len(spec.demo_template)) + sum(
            sizes.field(spec.label_field if v == "label" else v, spec.demonstrations.split) for v in sorted(read)
        )
        calls.append(BatchedCall("think", "think", d.backend, (d.name,), steps, steps * count * demo, 0))
        if spec.steps is None and dev_rows:
            select = sizes.forward(d, dev_rows * steps, "step_selection")
            calls.append(select)
    return (Stage(0, tuple(d.name for d, _ in thinkers), tuple(calls)),)


def _dev_rows(spec: Spec, profiles: dict[str, FieldProfile]) -> int:
    dev = profiles.get("dev")
    if dev is None:
        return 0
    return min(spec.train.dev_size, dev.rows) if spec.train.dev_size else dev.rows
