"""The plan is the program: the trainer makes exactly the backend calls the plan lists.

For every example spec in specs/, one training step runs on recording backends:
every real backend call is logged with (backend, op, requests) and the plan
call the trainer was making at that moment (`Trainer.current`). The log must
be the plan's forward calls (in order per backend) followed by its backward
calls (in stage order), each with the plan's backend and op, no more requests
than planned, no duplicate request, and the plan's nodes. A call the plan does
not list, or a planned call not made, fails the test.

Layer backends are tests/scripted_backend.py (no model), so this is fast. The
Deep-Thinking specs run with their Deep-Thinking node answered by a scripted
scorer through the same layer protocol (`ScriptedThinking`: its forward is one
`score` call on its backend, its `target_scores` a `Deferred` of `score`
requests, like the real layer's), not by the tiny seeded Llama: what is
checked here is who calls what, not what the state answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dlngraph.api import compile_spec
from dlngraph.compiler.plan import BatchedCall, ExecutionPlan, NodeKind, PlanNode
from dlngraph.runtime.backends.base import Score, ScoreRequest
from dlngraph.runtime.backward import Deferred, TargetScore, run_now
from dlngraph.runtime.cache import CachedBackend, MemoryCache
from dlngraph.runtime.data import read_jsonl
from dlngraph.runtime.fit import Fit
from dlngraph.runtime.layers.base import ForwardRecord, Params, Row
from dlngraph.runtime.rundir import RunDir
from dlngraph.runtime.template import render
from dlngraph.runtime.trainer import Trainer

from tests.scripted_backend import ScriptedBackend
from tests.test_trainer import DAG_SPEC, write_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))


@dataclass
class Recorded:
    backend: str
    op: str
    requests: list[Any]
    planned: tuple[int, BatchedCall] | None  # (backward stage, call) the trainer was making; None in the forward


@dataclass
class Recorder:
    """A backend that logs each real call, with the trainer's planned call as context."""

    name: str
    inner: ScriptedBackend
    log: list[Recorded]
    trainer: Trainer | None = None

    def __getattr__(self, name: str) -> Any:  # kind, identity, usage, capabilities
        return getattr(self.inner, name)

    def generate(self, requests: list) -> list:
        self.record("generate", requests)
        return self.inner.generate(requests)

    def score(self, requests: list) -> list:
        self.record("score", requests)
        return self.inner.score(requests)

    def record(self, op: str, requests: list) -> None:
        self.log.append(Recorded(self.name, op, list(requests), self.trainer.current if self.trainer else None))

    def close(self) -> None:
        pass


@dataclass
class ScriptedThinking:
    """A Deep-Thinking node answered by the scripted backend, through the layer protocol."""

    node: PlanNode
    backend: Recorder
    choices: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.choices = list(self.node.choices)

    def distributions(self, rows: Sequence[Row]) -> Deferred[list[dict[str, float]]]:
        requests = [
            ScoreRequest(prompt=render(self.node.spec.template, "", row, node=self.node.name), continuation=" " + c)
            for row in rows
            for c in self.choices
        ]

        def decode(scores: list[Score]) -> list[dict[str, float]]:
            k = len(self.choices)
            return [{c: s.total for c, s in zip(self.choices, scores[i : i + k])} for i in range(0, len(scores), k)]

        return Deferred(self.node.backend, "score", requests, decode)

    def params(self, seed: int) -> Params:
        return Params("")

    def forward(self, rows: list[Row], params: Params | None = None, *, seed: int = 0) -> ForwardRecord:
        scored = run_now(self.distributions(rows), self.backend)
        outputs = [max(self.choices, key=lp.__getitem__) for lp in scored]
        return ForwardRecord(self.node.name, "", [], outputs, scored)

    def target_scores(self, items: Sequence[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
        inner = self.distributions([row for _, row, _ in items])

        def decode(scores: list[Score]) -> list[TargetScore]:
            return [TargetScore(lp[t], lp) for (_, _, t), lp in zip(items, inner.decode(scores))]

        return Deferred(inner.backend, inner.op, inner.requests, decode)


def recording(plan: ExecutionPlan) -> tuple[dict[str, Recorder], list[Recorded], dict[str, ScriptedThinking]]:
    log: list[Recorded] = []
    backends = {name: Recorder(name, ScriptedBackend(), log) for name in sorted(plan.spec.backends)}
    thinking = {
        n: ScriptedThinking(node, backends[node.backend])
        for n, node in plan.nodes.items()
        if node.kind is NodeKind.DEEP_THINKING
    }
    return backends, log, thinking


def batch_of(plan: ExecutionPlan) -> list[dict[str, str]]:
    fields = [*plan.spec.inputs, *sorted(set(plan.spec.outputs.values()))]
    return read_jsonl(plan.data_paths["train"], fields, limit=plan.spec.train.batch_size)


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_the_trainer_makes_exactly_the_calls_the_plan_lists(spec: Path) -> None:
    plan = compile_spec(spec)
    backends, log, thinking = recording(plan)
    trainer = Trainer(plan, backends, seed=1, layers=thinking)
    for recorder in backends.values():
        recorder.trainer = trainer
    batch = batch_of(plan)
    assert len(batch) == plan.spec.train.batch_size  # the plan's calls are sized for a full batch
    trainer.step({}, batch, list(range(len(batch))), iteration=1)

    forward = [r for r in log if r.planned is None]
    for backend in backends:
        made = [(r.op, len(r.requests)) for r in forward if r.backend == backend]
        planned = [(c.op, c.requests) for s in plan.forward for c in s.calls if c.backend == backend]
        assert [op for op, _ in made] == [op for op, _ in planned], f"forward on {backend}"
        assert all(n <= p for (_, n), (_, p) in zip(made, planned)), f"forward on {backend}: {made} > {planned}"

    backward = [r for r in log if r.planned is not None]
    made_calls = [r.planned for r in backward]
    planned_calls = [(s.index, c) for s in plan.backward for c in s.calls]
    assert made_calls == planned_calls  # every planned call once, in order, and nothing else
    for r in backward:
        stage, call = r.planned
        assert (r.backend, r.op) == (call.backend, call.op), call
        assert 0 < len(r.requests) <= call.requests, (call, len(r.requests))
        assert len(set(r.requests)) == len(r.requests), f"duplicate requests in {call}"
    # the nodes whose requests each call carried are the plan's
    assert [(m.stage, m.call, m.nodes) for m in trainer.made] == [(s, c, c.nodes) for s, c in planned_calls]


VARIANTS = {
    # proposals and posterior samples written by another backend, a trust region on text layers
    "proposer-and-trust-region": (
        "train: {",
        "backends:\n  local: {kind: torch}\n  writer: {kind: litellm, model: openai/w, api_base: 'http://127.0.0.1:9/v1',"
        " capabilities: [generate]}\ndefault_backend: local\ntrain: {proposer: writer, trust_region: 0.5, ",
    ),
    "one-candidate": ("prompt_proposals: 3", "prompt_proposals: 1"),  # N = 1: the plan lists no proposals
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_of_a_dag_make_exactly_the_planned_calls(variant: str, tmp_path: Path) -> None:
    """The DAG with fan-out and fan-in of tests/test_trainer.py, changed in what the plan must follow."""
    old, new = VARIANTS[variant]
    assert old in DAG_SPEC
    plan = compile_spec(write_spec(tmp_path, DAG_SPEC.replace(old, new)))
    backends, log, _ = recording(plan)
    trainer = Trainer(plan, backends, seed=1)
    for recorder in backends.values():
        recorder.trainer = trainer
    trainer.step({}, batch_of(plan), list(range(plan.spec.train.batch_size)), iteration=1)
    backward = [r for r in log if r.planned is not None]
    assert [r.planned for r in backward] == [(s.index, c) for s in plan.backward for c in s.calls]
    assert all((r.backend, r.op) == (r.planned[1].backend, r.planned[1].op) for r in backward)
    assert all(len(r.requests) <= r.planned[1].requests for r in backward)
    purposes = {c.purpose: c.backend for s in plan.backward for c in s.calls}
    if variant == "one-candidate":
        assert "prompt_proposals" not in purposes
    else:
        assert purposes["prompt_proposals"] == purposes["posterior_sampling"] == "writer"


@dataclass
class Counted:
    """Above the response cache: per call the runtime makes, whether it reached the model."""

    inner: CachedBackend
    below: list[Recorded]  # the recorder under the cache
    reached: list[bool] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:  # kind, usage, capabilities, close
        return getattr(self.inner, name)

    def generate(self, requests: list) -> list:
        return self.count(self.inner.generate, requests)

    def score(self, requests: list) -> list:
        return self.count(self.inner.score, requests)

    def count(self, op: Any, requests: list) -> list:
        before = len(self.below)
        out = op(requests)
        self.reached.append(len(self.below) > before)
        return out


@pytest.mark.parametrize("spec", [p for p in SPECS if "think" not in p.stem], ids=lambda p: p.stem)
def test_a_whole_fit_makes_the_calls_the_plan_estimates(spec: Path, tmp_path: Path) -> None:
    """Two iterations behind the response cache, as `dlngraph fit` runs: the runtime makes
    the estimate's calls (forward, backward, label priors, dev evaluations) plus the
    final re-evaluation of the best parameters on dev, which the estimate leaves out
    because the cache answers all of it. A call the cache answers entirely never
    reaches the model: those are counted here, not assumed."""
    plan = compile_spec(spec)
    below, log, _ = recording(plan)
    backends = {n: Counted(CachedBackend(b, MemoryCache()), log) for n, b in below.items()}
    run = RunDir.create(tmp_path / "run", plan)
    Fit(plan, backends, run, iterations=2).run()
    reached = [r for b in backends.values() for r in b.reached]
    final = [c for s in plan.evaluation for c in s.calls if c.purpose == "forward"]
    assert len(reached) == plan.estimate(2).calls + len(final)
    assert not any(reached[-len(final) :])  # the best parameters were evaluated before: all cached
    assert len(log) == sum(reached) <= len(reached)
