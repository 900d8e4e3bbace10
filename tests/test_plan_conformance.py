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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from dlngraph.api import compile_spec
from dlngraph.compiler.plan import BatchedCall, ExecutionPlan, NodeKind, PlanNode, Stage
from dlngraph.runtime.backends.base import Score, ScoreRequest
from dlngraph.runtime.backward import Deferred, TargetScore, run_now
from dlngraph.runtime.cache import CachedBackend, MemoryCache
from dlngraph.runtime.data import read_jsonl
from dlngraph.runtime.executor import Executor
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
class Context:
    """What the runtime is making when a call reaches a backend: the trainer's backward
    call (`Trainer.current`), else the executor's stages and each backend's node."""

    plan: ExecutionPlan
    fit: Fit | None = None
    stages: tuple[Stage, ...] = ()
    label: str = ""
    node: dict[str, str] = field(default_factory=dict)  # backend -> the node whose forward runs on it

    def watch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        run, run_node = Executor.run, Executor.run_node
        plan = self.plan

        def watched_run(executor: Executor, examples: Any, stages: Any = None) -> Any:
            self.stages = tuple(plan.forward if stages is None else stages)
            if stages is None or stages is plan.forward:
                self.label = "forward"
            elif stages is plan.evaluation:
                self.label = "evaluation"
            else:
                self.label = "calibration" if all(s in plan.calibration for s in stages) else "other stages"
            return run(executor, examples, stages)

        def watched_node(executor: Executor, name: str, rows: Any) -> Any:
            backend = plan.nodes[name].backend
            self.node[backend] = name
            try:
                return run_node(executor, name, rows)
            finally:
                del self.node[backend]

        monkeypatch.setattr(Executor, "run", watched_run)
        monkeypatch.setattr(Executor, "run_node", watched_node)

    def planned(self, backend: str) -> tuple[str, BatchedCall | None, tuple[str, ...] | None]:
        """(what the runtime was making, the plan's call it was making, the node of its requests:
        None in the backward, whose nodes the trainer records in `Trainer.made`)."""
        trainer = self.fit.trainer if self.fit else None
        if trainer is not None and trainer.current is not None:
            return "backward", trainer.current[1], None
        node = self.node.get(backend, "")
        calls = [c for s in self.stages if node in s.nodes for c in s.calls if node in c.nodes]
        return self.label, calls[0] if len(calls) == 1 else None, (node,)


@dataclass
class Attributed:
    """Above the response cache: every call the runtime makes, with the plan's call it
    was making, and whether it reached the model (the recorder under the cache saw it)."""

    name: str
    inner: CachedBackend
    below: list[Recorded]  # the recorder under the cache
    context: Context
    made: list[dict[str, Any]]

    def __getattr__(self, name: str) -> Any:  # kind, usage, capabilities, close
        return getattr(self.inner, name)

    def generate(self, requests: list) -> list:
        return self.call("generate", self.inner.generate, requests)

    def score(self, requests: list) -> list:
        return self.call("score", self.inner.score, requests)

    def call(self, op: str, send: Any, requests: list) -> list:
        label, planned, nodes = self.context.planned(self.name)
        before = len(self.below)
        out = send(requests)
        self.made.append(
            {"backend": self.name, "op": op, "requests": len(requests), "label": label, "call": planned,
             "nodes": nodes, "reached": len(self.below) > before}
        )  # fmt: skip
        return out


def expected_calls(plan: ExecutionPlan, iterations: int, done: int) -> list[tuple[str, BatchedCall]]:
    """The plan's calls of a fit of `iterations` that ran `done`, in the order the fit
    makes them: label priors and dev evaluation (iteration 0), per iteration its forward,
    backward, label priors and (when due) dev evaluation, and the final re-evaluation of
    the best parameters on dev."""
    calls = lambda label, stages: [(label, c) for s in stages for c in s.calls]  # noqa: E731
    evaluation = calls("evaluation", plan.evaluation)
    out = calls("calibration", plan.calibration) + evaluation
    every = plan.spec.train.eval_every
    for i in range(1, done + 1):
        out += calls("forward", plan.forward) + calls("backward", plan.backward) + calls("calibration", plan.calibration)
        out += evaluation if i % every == 0 or i == iterations else []
    return out + evaluation


def fit_problems(plan: ExecutionPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fit_class: type[Fit] = Fit) -> list[str]:
    """A whole fit of 2 iterations behind the response cache, as `dlngraph fit` runs it:
    every call the runtime makes, per backend in order, must be the plan's next call
    (same label, backend, op and nodes, no more requests), and the plan's calls are
    all made. A call the cache answers entirely never reaches the model: those are
    counted, not assumed (the final re-evaluation of the best parameters is all cached)."""
    context = Context(plan)
    context.watch(monkeypatch)
    below, log, _ = recording(plan)
    made: list[dict[str, Any]] = []
    backends = {n: Attributed(n, CachedBackend(b, MemoryCache()), log, context, made) for n, b in below.items()}
    fit = fit_class(plan, backends, RunDir.create(tmp_path / "run", plan), iterations=2)
    context.fit = fit
    result = fit.run()
    expected = expected_calls(plan, 2, result.iterations)
    problems = []
    for backend in sorted(backends):
        got = [(m["label"], m["call"]) for m in made if m["backend"] == backend]
        want = [(label, c) for label, c in expected if c.backend == backend]
        if got != want:
            first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            problems.append(f"{backend}: call {first} is {got[first:first + 1]}, the plan's is {want[first:first + 1]}")
    for m in made:
        call = m["call"]
        if call is None:
            problems.append(f"{m['backend']}: a {m['label']} call of {m['nodes']} that no planned call lists")
        elif (m["op"], m["nodes"] or call.nodes) != (call.op, call.nodes) or not 0 < m["requests"] <= call.requests:
            problems.append(f"{m['backend']}: {m['op']} of {m['nodes']} with {m['requests']} requests for {call}")
    assert fit.trainer is not None
    problems += [f"backward: {m.call} carried the requests of {m.nodes}" for m in fit.trainer.made if m.nodes != m.call.nodes]
    if result.iterations == 2 and len(made) != plan.estimate(2).calls + len(calls_of(plan.evaluation)):
        problems.append(f"{len(made)} calls made, the estimate is {plan.estimate(2).calls} plus the final evaluation")
    final = len(calls_of(plan.evaluation))
    if final and any(m["reached"] for m in made[-final:]):
        problems.append("the final evaluation of the best parameters reached the model")
    if len(log) != sum(m["reached"] for m in made):
        problems.append(f"{len(log)} calls reached the model, {sum(m['reached'] for m in made)} counted")
    return problems


def calls_of(stages: tuple[Stage, ...]) -> list[BatchedCall]:
    return [c for s in stages for c in s.calls]


CHOICE_D = "output: {type: choice, choices: [yes, no]}"
TEXT_A = '    template: "{{ prompt }} A-node {{ input }}"\n    output: {type: text, max_tokens: 8, stop: ["\\n"]}'
CALIBRATED = {
    # a batch-calibrated choice node reading three text nodes: they run on the calibration inputs too
    "batch-calibrated-dag": [(CHOICE_D, CHOICE_D + "\n    calibration: batch")],
    # contextual: the node alone, over the content-free inputs (its parents read them too)
    "contextual-calibrated-dag": [(CHOICE_D, CHOICE_D + "\n    calibration: contextual")],
    # both: the contextual choice node `a` is an ancestor of the batch-calibrated `d`, so its
    # calibration call scores the calibration inputs and the content-free ones together
    "mixed-calibrated-dag": [
        (CHOICE_D, CHOICE_D + "\n    calibration: batch"),
        (TEXT_A, TEXT_A.split("\n")[0] + "\n    output: {type: choice, choices: [up, down]}\n    calibration: contextual"),
    ],
}


def calibrated_dag(tmp_path: Path, variant: str) -> ExecutionPlan:
    text = DAG_SPEC.replace("patience: 2", "patience: 2, calibration_size: 5")
    for old, new in CALIBRATED[variant]:
        assert old in text
        text = text.replace(old, new)
    return compile_spec(write_spec(tmp_path, text))


@pytest.mark.parametrize("spec", [p for p in SPECS if "think" not in p.stem], ids=lambda p: p.stem)
def test_a_whole_fit_makes_exactly_the_planned_calls(spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fit_problems(compile_spec(spec), tmp_path, monkeypatch) == []


@pytest.mark.parametrize("variant", sorted(CALIBRATED))
def test_a_whole_fit_of_a_calibrated_dag_makes_exactly_the_planned_calls(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = calibrated_dag(tmp_path, variant)
    purposes = [(c.purpose, c.nodes, c.requests) for c in calls_of(plan.calibration)]
    # 5 inputs through a (and its 3 content-free inputs when contextual), then b and c, then d's 5 x 2 choices
    batch = [("calibration", ("a",), 5), ("calibration", ("b",), 5), ("calibration", ("c",), 5), ("calibration", ("d",), 10)]
    expected = {
        "batch-calibrated-dag": batch,
        "contextual-calibrated-dag": [("content_free_calibration", ("d",), 6)],  # d's 2 choices of 3 content-free inputs
        "mixed-calibrated-dag": [("calibration", ("a",), (5 + 3) * 2), *batch[1:]],
    }
    assert purposes == expected[variant]
    problems = fit_problems(plan, tmp_path, monkeypatch)
    assert problems == [], "\n".join(problems)


class AllNodesCalibration(Fit):
    """The label priors estimated by a forward of every node over the calibration inputs
    (the first one for contextual calibration), as the fit did before the plan listed them."""

    def calibrate(self, params: dict[str, Params]) -> dict[str, Params]:
        stale = [n for n in params if self.plan.nodes[n].fits_prior]
        if not stale:
            return params
        assert self.trainer is not None
        batch = any(self.plan.nodes[n].calibration == "batch" for n in stale)
        records = self.trainer.executor(params).run(self.calibration_set if batch else self.calibration_set[:1]).records
        return {**params, **{n: replace(params[n], bias=tuple(sorted(records[n].extra["bias"].items()))) for n in stale}}


@pytest.mark.parametrize("variant", sorted(CALIBRATED))
def test_the_whole_fit_check_fails_for_calibration_calls_the_plan_does_not_list(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    problems = fit_problems(calibrated_dag(tmp_path, variant), tmp_path, monkeypatch, AllNodesCalibration)
    assert any("the plan's is [('calibration'" in p for p in problems), problems
