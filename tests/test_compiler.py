"""The compiler on the example specs: passes, contracts, plan shape, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import networkx as nx
import pytest

from dlngraph.capabilities import Capability
from dlngraph.errors import SpecError
from dlngraph.compiler import ir, pipeline, schedule
from dlngraph.compiler.ir import NodeKind, Unit, lint
from dlngraph.compiler.pipeline import Pass, PassContractError, check_order, compile_unit
from dlngraph.compiler.render import render

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def _compile(path: Path, **kw):
    seen: list[str] = []

    def after(name: str, unit: Unit) -> None:
        seen.append(name)
        if unit.graph is not None:
            lint(unit.graph)

    unit = compile_unit(path, after_each=after, **kw)
    return unit, seen


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_specs_compile_with_every_pass_linted(path: Path) -> None:
    unit, seen = _compile(path)
    assert seen == [m.__name__.rsplit(".", 1)[-1] for m in pipeline.PASSES]
    plan = unit.plan
    assert plan is not None
    assert sorted(plan.nodes) == list(plan.nodes)
    assert sorted(plan.topological_order) == sorted(plan.nodes)
    assert all(p.is_absolute() and p.is_file() for p in plan.data_paths.values())
    assert plan.estimate().requests >= plan.estimate_per_iteration.requests > 0


def test_dln2_schedule_has_posterior_for_the_hidden_layer() -> None:
    plan = compile_unit(ROOT / "specs/dln2-subj.yaml").plan
    train = plan.spec.train
    assert [s.nodes for s in plan.forward] == [("reason",), ("answer",)]
    assert [s.nodes for s in plan.backward] == [("answer",), ("reason",)]
    purposes = {c.purpose: c for c in plan.backward[1].calls}
    assert purposes["posterior_sampling"].requests == train.batch_size * train.posterior_samples
    # every candidate (the current output and K samples) scored under reason itself (its prior)
    # and under answer against both of its choices
    candidates = train.batch_size * (train.posterior_samples + 1)
    assert purposes["child_rescoring"].requests == candidates + candidates * 2
    assert purposes["child_rescoring"].nodes == ("answer", "reason")
    assert plan.nodes["reason"].needs_posterior and not plan.nodes["answer"].needs_posterior
    assert purposes["prompt_proposals"].requests == train.prompt_proposals - 1
    # candidates: the current prompt, N - 1 proposals and the dev memory (no demos here)
    assert purposes["candidate_scoring"].requests == (train.prompt_proposals + train.memory) * train.batch_size
    assert "posterior_sampling" not in {c.purpose for c in plan.backward[0].calls}
    assert plan.nodes["reason"].children == ("answer",)
    assert plan.nodes["answer"].parents == ("reason",)


def test_wide_dag_parallel_layers_share_a_stage_and_backward_merges_per_backend() -> None:
    plan = compile_unit(ROOT / "specs/wide-dag.yaml").plan
    assert [s.nodes for s in plan.forward] == [("facts", "tone"), ("answer",)]
    assert [len(s.calls) for s in plan.forward] == [2, 1]  # one batched call per node
    hidden = plan.backward[1]
    proposals = [c for c in hidden.calls if c.purpose == "prompt_proposals"]
    assert len(proposals) == 1 and proposals[0].nodes == ("facts", "tone")


def test_deep_thinking_gets_a_think_stage_and_no_training_iterations() -> None:
    plan = compile_unit(ROOT / "specs/deep-thinking-subj.yaml").plan
    assert plan.nodes["answer"].kind is NodeKind.DEEP_THINKING
    assert plan.think and plan.think[0].nodes == ("answer",)
    assert plan.think[0].calls[0].op == "think"
    assert not plan.nodes["answer"].trainable
    assert plan.evaluations() == 1
    once = sum(c.requests for s in plan.think + plan.evaluation for c in s.calls)
    assert plan.estimate().requests == once
    assert plan.estimate(iterations=5) == plan.estimate()  # nothing trainable: no iterations whatever is asked


def test_fit_estimate_is_iterations_times_per_iteration_plus_evaluations() -> None:
    plan = compile_unit(ROOT / "specs/dln1-mpqa.yaml").plan
    train = plan.spec.train
    evaluation = sum(c.requests for s in plan.evaluation for c in s.calls)
    assert plan.evaluations() == train.iterations // train.eval_every + 1
    assert plan.estimate().requests == (
        train.iterations * plan.estimate_per_iteration.requests + plan.evaluations() * evaluation
    )
    # another iteration count: the same sum, with the evaluations that count implies
    assert plan.evaluations(2 * train.eval_every) == 3
    assert plan.estimate(2 * train.eval_every).calls == (
        2 * train.eval_every * plan.estimate_per_iteration.calls + 3 * sum(len(s.calls) for s in plan.evaluation)
    )
    # the dev evaluation scores both choices of dev_size examples
    assert evaluation == train.dev_size * 2
    # eval_every not dividing the iterations: the fit evaluates after the last one too
    every = replace(plan, spec=plan.spec.model_copy(update={"train": train.model_copy(update={"eval_every": 2})}))
    assert [every.evaluations(n) for n in (1, 2, 3, 4)] == [2, 2, 3, 3]


def test_label_priors_are_estimated_by_the_plans_calibration_stages() -> None:
    """A batch-calibrated trainable choice layer: its prior is estimated before the first
    evaluation and after every iteration, over calibration_size train inputs."""
    plan = compile_unit(ROOT / "specs/dln1-mpqa-demos.yaml").plan
    train = plan.spec.train
    assert plan.nodes["answer"].fits_prior and plan.nodes["answer"].calibration == "batch"
    (stage,) = plan.calibration
    assert [(c.purpose, c.op, c.nodes, c.requests) for c in stage.calls] == [
        ("calibration", "score", ("answer",), train.calibration_size * len(plan.nodes["answer"].choices))
    ]
    assert all(c.purpose == "forward" for s in plan.evaluation for c in s.calls)
    assert plan.calibrations() == train.iterations + 1
    once = plan.estimate(0)  # the initial estimate and evaluation, nothing trained
    assert once.calls == len(stage.calls) + sum(len(s.calls) for s in plan.evaluation)
    assert plan.estimate().calls == (
        train.iterations * (plan.estimate_per_iteration.calls + len(stage.calls))
        + once.calls
        + (plan.evaluations() - 1) * sum(len(s.calls) for s in plan.evaluation)
    )
    assert plan.to_dict()["calibrations"] == plan.calibrations()
    assert compile_unit(ROOT / "specs/dln1-mpqa.yaml").plan.calibration == ()  # nothing calibrated


def test_json_is_byte_identical_across_hash_seeds(tmp_path: Path) -> None:
    code = "import sys; from dlngraph.api import compile_spec; sys.stdout.write(compile_spec(sys.argv[1]).to_json())"
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code, str(ROOT / "specs/wide-dag.yaml")],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        outs.append(done.stdout)
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["forward"][0]["nodes"] == ["facts", "tone"]


def test_renderers_are_deterministic_and_mention_every_node() -> None:
    plan = compile_unit(ROOT / "specs/wide-dag.yaml").plan
    for fmt in ("text", "json", "dot", "mermaid"):
        out = render(plan, fmt)
        assert out == render(plan, fmt)
        assert all(name in out for name in plan.nodes)
    assert render(plan, "dot").startswith('digraph "wide-dag-mpqa" {')
    assert "n_tone --> n_answer" in render(plan, "mermaid")


def test_pipeline_rejects_out_of_order_passes() -> None:
    passes = [Pass.of(m) for m in pipeline.PASSES]
    with pytest.raises(PassContractError, match="pass 'resolve' requires"):
        check_order([passes[0], passes[2]])


def test_pipeline_names_a_pass_that_breaks_its_guarantee() -> None:
    passes = [Pass.of(m) for m in pipeline.PASSES]
    broken = replace(passes[2], run=lambda unit: unit)  # resolve that builds no graph
    with pytest.raises(PassContractError, match="pass 'resolve' did not establish"):
        pipeline.run_passes(Unit(path=ROOT / "specs/dln1-mpqa.yaml"), passes[:2] + [broken])


def test_unexpected_exception_is_annotated_with_the_pass() -> None:
    passes = [Pass.of(m) for m in pipeline.PASSES]

    def explode(unit: Unit) -> Unit:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError) as info:
        pipeline.run_passes(Unit(path=ROOT / "specs/dln1-mpqa.yaml"), [passes[0], replace(passes[1], run=explode)])
    assert "in compiler pass 'validate'" in info.value.__notes__


def test_lint_catches_an_edge_the_node_data_does_not_declare() -> None:
    unit = compile_unit(ROOT / "specs/dln2-subj.yaml")
    graph = nx.DiGraph(unit.graph)
    graph.add_edge("answer", "reason")
    with pytest.raises(ir.LintError, match="edges"):
        lint(graph)


def test_capability_resolver_hook_decides(tmp_path: Path) -> None:
    def no_scoring(name: str, spec: object) -> frozenset[Capability]:
        return frozenset({Capability.GENERATE})

    with pytest.raises(SpecError) as info:
        compile_unit(ROOT / "specs/dln1-mpqa.yaml", capability_resolver=no_scoring)
    assert [d.code for d in info.value.diagnostics] == ["E401"]
    assert "score or top_logprobs" in info.value.diagnostics[0].message


def test_top_logprobs_backend_schedules_choice_forward_as_one_token_per_example() -> None:
    def logprobs_only(name: str, spec: object) -> frozenset[Capability]:
        return frozenset({Capability.GENERATE, Capability.TOP_LOGPROBS})

    plan = compile_unit(ROOT / "specs/dln1-mpqa.yaml", capability_resolver=logprobs_only).plan
    scoring = compile_unit(ROOT / "specs/dln1-mpqa.yaml").plan
    call, exact = plan.forward[0].calls[0], scoring.forward[0].calls[0]
    b = plan.spec.train.batch_size
    # the runtime sends the same score requests (every choice of every example) ...
    assert (call.op, call.requests) == (exact.op, exact.requests) == ("score", b * 2)
    # ... which the backend answers with one generated token per example
    assert call.completion_tokens == b and call.prompt_tokens == exact.prompt_tokens // 2


def test_token_estimate_uses_data_lengths() -> None:
    plan = compile_unit(ROOT / "specs/dln1-mpqa.yaml").plan
    rows = [json.loads(line) for line in (ROOT / "specs/data/mpqa/train.jsonl").read_text().splitlines()[:200]]
    mean_input = sum(len(r["input"]) for r in rows) / len(rows)
    node = plan.spec.nodes["answer"]
    per_request = schedule.tokens(len(node.template)) + schedule.tokens(len(node.prompt)) + schedule.tokens(mean_input)
    call = plan.forward[0].calls[0]
    assert call.prompt_tokens == per_request * call.requests
