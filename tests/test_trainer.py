"""The variational trainer's pieces, with a scripted backend (no model).

Covers meta-prompt rendering, posterior weighting, candidate selection, target
propagation on a DAG with fan-out and fan-in, deduplication, and the fit loop
(best-on-dev, early stop, resume). That the trainer makes exactly the plan's
calls is tests/test_plan_conformance.py's.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from dlngraph.api import compile_spec
from dlngraph.spec import TrainSpec
from dlngraph.runtime.backends.base import GenerateRequest, Generation, ScoreRequest
from dlngraph.runtime.backward import (
    Attempt,
    TargetScore,
    filter_proposals,
    meta_sample,
    posterior_logits,
    posterior_weights,
    proposal_requests,
    render_meta,
    select_candidate,
)
from dlngraph.runtime.rundir import RunDir
from dlngraph.runtime.fit import Fit
from dlngraph.runtime.executor import RunResult
from dlngraph.runtime.layers.base import ForwardRecord
from dlngraph.runtime.trainer import Pass, Trainer

from tests.scripted_backend import ScriptedBackend, hashed_text



# ---------------------------------------------------------------------- meta-prompts


def test_proposal_meta_prompt_shows_prompt_successes_and_failures():
    text = render_meta(
        "proposal.jinja",
        prompt="Classify the review.",
        successes=[Attempt("great film", "positive", "positive", True)],
        failures=[Attempt("dull plot", "positive", "negative", False)],
        directive="Shorten it.",
    )
    assert "> Classify the review." in text and "Shorten it. Write only the new instruction" in text
    assert "Input: great film\nCorrect output: positive" in text
    assert "Input: dull plot\nStudent output: positive\nCorrect output: negative" in text
    # the open quote primes a small model to write the instruction itself (a bare heading got empty replies)
    assert text.endswith("## Improved instruction\n>")


def test_proposal_meta_prompt_without_failures_has_no_error_section():
    text = render_meta("proposal.jinja", prompt="p", successes=[Attempt("a", "x", "x", True)], failures=[], directive="d")
    assert "got wrong" not in text and "got right" in text


def test_each_proposal_asks_for_the_next_directive_and_copies_are_dropped():
    train = TrainSpec(prompt_proposals=4, proposal_directives=["Shorten it.", "Clarify it."])
    deferred = proposal_requests("b", "Classify.", [Attempt("x", "no", "yes", False)], train, random.Random(0), seed=1)
    asked = [next(d for d in train.proposal_directives if d in r.prompt) for r in deferred.requests]
    assert asked == ["Shorten it.", "Clarify it.", "Shorten it."]
    assert len({r.seed for r in deferred.requests}) == 3  # same directive, different sample
    generations = [Generation(texts=(t,)) for t in ("Short.", " Classify. ", "Short.")]
    texts = deferred.decode(generations)
    assert texts == ["Short.", "Classify.", "Short."]
    kept, dropped = filter_proposals("Classify.", texts, train.proposal_directives)
    assert kept == ["Short."]
    assert dropped == {"empty": 0, "duplicate": 2, "scaffolding": 0}


def test_posterior_meta_prompt_lists_every_child_target():
    text = render_meta(
        "posterior.jinja",
        prompt="Reason.",
        input="the input",
        output="old reasoning",
        targets=[{"node": "answer", "target": "positive"}, {"node": "topic", "target": "films"}],
        forward="Reason.\n\nthe input\nReasoning: It",
    )
    assert "old reasoning" in text and "answer: positive\ntopic: films" in text
    # a sample continues the node's own prompt, in the form its forward output has
    assert text.endswith("## Better intermediate step\nReason.\n\nthe input\nReasoning: It")


def test_meta_sample_gives_failures_at_least_half_and_respects_count():
    attempts = [Attempt(f"s{i}", "y", "y", True) for i in range(6)] + [Attempt(f"f{i}", "n", "y", False) for i in range(6)]
    successes, failures = meta_sample(attempts, 5, random.Random(0))
    assert (len(successes), len(failures)) == (2, 3)
    assert all(a.correct for a in successes) and not any(a.correct for a in failures)
    only_right = [Attempt("a", "y", "y", True)] * 3
    assert meta_sample(only_right, 5, random.Random(0)) == (only_right, [])


# ---------------------------------------------------------------------- posterior weighting


def test_posterior_weights_are_a_tempered_softmax():
    weights = posterior_weights([math.log(1), math.log(3)], 1.0)
    assert weights == pytest.approx([0.25, 0.75])
    hot = posterior_weights([math.log(1), math.log(3)], 1e6)
    assert hot == pytest.approx([0.5, 0.5], abs=1e-5)
    assert posterior_weights([-math.inf, 0.0], 1.0) == [0.0, 1.0]
    assert posterior_weights([-math.inf, -math.inf], 1.0) == [0.5, 0.5]


def test_posterior_logits_sum_every_child_and_penalize_wrong_answers():
    prior = [-1.0, -2.0]
    child_a = [TargetScore(-0.5, {"yes": -0.5, "no": -0.9}), TargetScore(-3.0, {"yes": -3.0, "no": -0.05})]
    child_b = [TargetScore(-0.25), TargetScore(-0.75)]
    logits = posterior_logits(prior, [child_a, child_b], ["yes", "done"], wrong_hidden_penalty=0.0)
    assert logits == pytest.approx([-1.0 - 0.5 - 0.25, -2.0 - 3.0 - 0.75])
    penalized = posterior_logits(prior, [child_a, child_b], ["yes", "done"], wrong_hidden_penalty=10.0)
    # Candidate 1 makes the choice child answer "no" instead of "yes"; the text child has no "answer".
    assert penalized == pytest.approx([logits[0], logits[1] - 10.0])


# ---------------------------------------------------------------------- candidate selection


def test_select_candidate_takes_the_argmax_of_mean_target_logprob():
    scores = [[TargetScore(-1.0), TargetScore(-1.0)], [TargetScore(-0.2), TargetScore(-0.4)], [TargetScore(-2.0)] * 2]
    chosen = select_candidate(["cur", "new", "bad"], scores, trust_region=0.0)
    assert (chosen.candidate, chosen.index) == ("new", 1)
    assert chosen.loss == pytest.approx(0.3)


def test_select_candidate_keeps_the_current_prompt_on_a_tie():
    scores = [[TargetScore(-0.5)], [TargetScore(-0.5)]]
    assert select_candidate(["cur", "same"], scores, 0.0).index == 0


def test_trust_region_penalizes_candidates_that_move_the_class_distribution():
    def dist(p_yes: float) -> dict[str, float]:
        return {"yes": math.log(p_yes), "no": math.log(1 - p_yes)}

    current = [TargetScore(math.log(0.6), dist(0.6))]
    near = [TargetScore(math.log(0.65), dist(0.65))]
    far = [TargetScore(math.log(0.99), dist(0.99))]
    assert select_candidate(["cur", "near", "far"], [current, near, far], 0.0).candidate == "far"
    assert select_candidate(["cur", "near", "far"], [current, near, far], 2.0).candidate == "near"


# ---------------------------------------------------------------------- a DAG with fan-out and fan-in

DAG_SPEC = """
name: fan
data: {train: train.jsonl, dev: dev.jsonl}
inputs: [input]
nodes:
  a:
    prompt: A-prompt
    template: "{{ prompt }} A-node {{ input }}"
    output: {type: text, max_tokens: 8, stop: ["\\n"]}
  b:
    prompt: B-prompt
    template: "{{ prompt }} B-node {{ a }}"
    output: {type: text, max_tokens: 8, stop: ["\\n"]}
  c:
    prompt: C-prompt
    template: "{{ prompt }} C-node {{ a }}"
    output: {type: text, max_tokens: 8, stop: ["\\n"]}
  d:
    prompt: D-prompt
    template: "{{ prompt }} D-node {{ b }} {{ c }} Answer:"
    output: {type: choice, choices: [yes, no]}
outputs: {d: label}
train: {iterations: 3, batch_size: 3, prompt_proposals: 3, posterior_samples: 2, dev_size: 4, patience: 2, seed: 7}
"""


def write_spec(tmp_path: Path, text: str = DAG_SPEC, rows: int = 12) -> Path:
    for split in ("train", "dev"):
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"input": f"{split} example {i}", "label": "yes" if i % 3 else "no"}) + "\n")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_backward_walks_stages_in_reverse_topological_order(tmp_path):
    """Which calls each stage makes is tests/test_plan_conformance.py's; here the order of the stages."""
    plan = compile_spec(write_spec(tmp_path))
    assert [s.nodes for s in plan.backward] == [("d",), ("b", "c"), ("a",)]
    trainer = Trainer(plan, {"local": ScriptedBackend()}, seed=1)
    examples = [{"input": f"x{i}", "label": "yes"} for i in range(3)]
    trainer.step({n: plan.spec.nodes[n].prompt for n in plan.nodes}, examples, [0, 1, 2], iteration=1)
    assert [m.stage for m in trainer.made] == sorted(m.stage for m in trainer.made)
    assert {m.stage for m in trainer.made} == {0, 1, 2}


def test_targets_propagate_from_children_and_fan_in_sums_both_children(tmp_path):
    plan = compile_spec(write_spec(tmp_path))
    backend = ScriptedBackend()
    trainer = Trainer(plan, {"local": backend}, seed=1)
    examples = [{"input": f"x{i}", "label": "no"} for i in range(3)]
    result = trainer.step({n: plan.spec.nodes[n].prompt for n in plan.nodes}, examples, [0, 1, 2], iteration=1)
    by_node = {}
    for record in result.posteriors:
        by_node.setdefault(record["node"], []).append(record)
    assert set(by_node) == {"a", "b", "c"}  # every hidden node got targets; the output's are data
    for record in result.posteriors:
        weights = [c["weight"] for c in record["candidates"]]
        assert sum(weights) == pytest.approx(1.0)
        assert record["chosen"] == record["candidates"][weights.index(max(weights))]["text"]

    rescoring = [requests for (op, requests), call in zip(backend.log, _ops(trainer)) if call == "child_rescoring"]
    stage_bc, stage_a = rescoring
    # b and c are re-scored under d, with d's target from the data ...
    d_requests = [r for r in stage_bc if "D-node" in r.prefix + r.prompt]
    assert d_requests and {r.continuation.strip() for r in d_requests} == {"yes", "no"}
    # ... and a's candidates under BOTH children b and c, each with its own chosen target (fan-in of feedback).
    chosen = {n: {r["chosen"] for r in by_node[n]} for n in ("b", "c")}
    for child in ("b", "c"):
        under = [r for r in stage_a if f"{child.upper()}-node" in r.prefix + r.prompt]
        assert under, f"a was not re-scored under {child}"
        assert {r.continuation.strip() for r in under} >= chosen[child] - {""}


def _ops(trainer: Trainer) -> list[str]:
    return [m.call.purpose for m in trainer.made]


def test_identical_backward_requests_are_sent_once(tmp_path):
    plan = compile_spec(write_spec(tmp_path))
    backend = ScriptedBackend()
    trainer = Trainer(plan, {"local": backend}, seed=1)
    same = [{"input": "the same", "label": "yes"}] * 3
    trainer.step({n: plan.spec.nodes[n].prompt for n in plan.nodes}, same, [0, 0, 0], iteration=1)
    backward = backend.log[len(plan.nodes) :]  # after one forward call per node (the cache dedupes those)
    assert len(backward) == len(trainer.made)
    for op, requests in backward:
        assert len(requests) == len(set(requests)), f"duplicate {op} requests in one call"


def test_the_best_candidate_under_the_scores_is_selected(tmp_path):
    """A backend under which prompts saying GOOD make every target likely: the
    proposal saying GOOD wins and is accepted."""
    plan = compile_spec(write_spec(tmp_path, DAG_SPEC.replace("D-prompt", "plain")))

    def text(r: GenerateRequest) -> str:
        return "GOOD advice" if "Improved instruction" in r.prompt else hashed_text(r)

    def logprobs(r: ScoreRequest) -> list[float]:
        return [-0.01 if "GOOD" in r.prefix + r.prompt and r.continuation.strip() == "yes" else -2.0]

    trainer = Trainer(plan, {"local": ScriptedBackend(text=text, logprobs=logprobs)}, seed=3)
    examples = [{"input": f"x{i}", "label": "yes"} for i in range(3)]
    result = trainer.step({n: plan.spec.nodes[n].prompt for n in plan.nodes}, examples, [0, 1, 2], iteration=1)
    assert result.prompts["d"] == "GOOD advice" and result.accepted["d"]


def test_empty_generations_are_scored_not_crashed(tmp_path):
    plan = compile_spec(write_spec(tmp_path))
    trainer = Trainer(plan, {"local": ScriptedBackend(text=lambda r: "")}, seed=1)
    examples = [{"input": f"x{i}", "label": "yes"} for i in range(3)]
    result = trainer.step({n: plan.spec.nodes[n].prompt for n in plan.nodes}, examples, [0, 1, 2], iteration=1)
    assert result.prompts == {n: plan.spec.nodes[n].prompt for n in plan.nodes}  # nothing to propose
    assert all(math.isfinite(v) for v in result.loss.values())


# ---------------------------------------------------------------------- the fit loop


def _fit(tmp_path: Path, name: str, **kwargs) -> tuple[RunDir, object]:
    plan = compile_spec(write_spec(tmp_path))
    run = RunDir.create(tmp_path / name, plan)
    return run, Fit(plan, {"local": ScriptedBackend()}, run, **kwargs).run()


def test_fit_writes_the_run_directory_contract(tmp_path):
    run, result = _fit(tmp_path, "run")
    metrics = run.read(run.metrics)
    assert [m["iteration"] for m in metrics] == list(range(result.iterations + 1))
    assert set(metrics[1]) == {
        "iteration", "train_acc", "dev_acc", "loss", "accepted", "dropped_proposals", "calls", "requests",
        "prompt_tokens", "completion_tokens", "cost", "seconds",
    }
    assert metrics[0]["train_acc"] is None and metrics[0]["dev_acc"] is not None
    assert set(metrics[1]["loss"]) == {"a", "b", "c", "d"}
    for name in ("spec.yaml", "plan.json", "best.yaml", "posteriors.jsonl", "curve.png"):
        assert (run.path / name).is_file(), name
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        f"iter-{i:04d}.yaml" for i in range(result.iterations + 1)
    ]
    best = yaml.safe_load(run.best.read_text())
    assert set(best) == {"iteration", "dev_acc", "dev_loglik", "prompts", "demos", "calibration"}
    rows = run.read(run.predictions("initial"))
    assert len(rows) == 4 and set(rows[0]) == {"index", "input", "target", "prediction", "correct"}
    assert run.predictions("best").is_file()


def test_best_on_dev_never_ends_below_the_initial_prompts(tmp_path):
    run, result = _fit(tmp_path, "run")
    metrics = run.read(run.metrics)
    assert result.best["dev_acc"] == max(m["dev_acc"] for m in metrics if m["dev_acc"] is not None)
    assert result.best["dev_acc"] >= metrics[0]["dev_acc"]


def test_early_stop_after_patience_evaluations_without_gain(tmp_path):
    plan = compile_spec(write_spec(tmp_path, DAG_SPEC.replace("patience: 2", "patience: 1")))
    run = RunDir.create(tmp_path / "run", plan)
    # Every choice equally likely: dev accuracy never improves on iteration 0.
    backend = ScriptedBackend(logprobs=lambda r: [-1.0])
    result = Fit(plan, {"local": backend}, run, iterations=5).run()
    assert result.stopped_early and result.iterations == 1


def test_resume_from_a_checkpoint_ends_with_the_same_prompts(tmp_path):
    _, whole = _fit(tmp_path, "whole")
    run, _ = _fit(tmp_path, "part", iterations=1)
    plan = compile_spec(tmp_path / "spec.yaml")
    resumed = Fit.resume(run.path, plan, backends={"local": ScriptedBackend()}).run()
    assert resumed.prompts == whole.prompts and resumed.best == whole.best
    assert [m["iteration"] for m in run.read(run.metrics)] == list(range(resumed.iterations + 1))


def test_a_run_killed_after_its_metrics_line_repeats_that_iteration_once(tmp_path):
    run, _ = _fit(tmp_path, "run", iterations=2)
    (run.checkpoint_path(2)).unlink()  # as if killed between metrics.jsonl and the checkpoint
    plan = compile_spec(tmp_path / "spec.yaml")
    Fit.resume(run.path, plan, backends={"local": ScriptedBackend()}, iterations=2).run()
    assert [m["iteration"] for m in run.read(run.metrics)] == [0, 1, 2]



def test_an_untrained_hidden_node_still_passes_feedback_upstream(tmp_path):
    frozen = DAG_SPEC.replace("    prompt: B-prompt\n", "    prompt: B-prompt\n    trainable: false\n")
    plan = compile_spec(write_spec(tmp_path, frozen))
    trainer = Trainer(plan, {"local": ScriptedBackend()}, seed=1)
    examples = [{"input": f"x{i}", "label": "yes"} for i in range(3)]
    result = trainer.step({"a": "A-prompt", "c": "C-prompt", "d": "D-prompt"}, examples, [0, 1, 2], iteration=1)
    assert set(result.prompts) == {"a", "c", "d"} and "b" not in result.loss
    assert {r["node"] for r in result.posteriors} == {"a", "b", "c"}  # b's targets feed a's posterior


@pytest.mark.parametrize("metric, correct", [("accuracy", [False, True]), ("exact_match", [True, True])])
def test_meta_prompt_successes_follow_the_spec_metric(tmp_path, metric, correct):
    """An answer differing from its target only in case and punctuation is a success
    under exact_match (as the evaluation counts it), a failure under accuracy."""
    text = DAG_SPEC.replace("outputs: {d: label}", f"outputs: {{d: label}}\nmetric: {metric}")
    plan = compile_spec(write_spec(tmp_path, text))
    trainer = Trainer(plan, {"local": ScriptedBackend()}, seed=1)
    record = ForwardRecord(node="d", prompt="p", rendered=["", ""], outputs=["Yes.", "no"])
    rows = [{"b": "x", "c": "y"}] * 2
    state = Pass([{}, {}], [0, 1], RunResult(records={"d": record}), {"d": rows}, {"d": ["yes", "no"]})
    assert [a.correct for a in trainer.attempts("d", state)] == correct
