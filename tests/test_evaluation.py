"""The one evaluation path (`runtime.evaluation`) with a scripted backend: the
prediction rows, per-output scores and the targets' log-likelihood do not depend
on how the examples are batched, and several outputs give mapping rows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from dlngraph.api import compile_spec
from dlngraph.runtime.data import read_split
from dlngraph.runtime.evaluation import evaluate
from dlngraph.runtime.executor import Executor

from tests.scripted_backend import ScriptedBackend

SPEC = """
name: two-outputs
data: {dev: dev.jsonl}
inputs: [text, topic]
nodes:
  mood:
    prompt: Mood?
    template: "{{ prompt }} {{ text }} ({{ topic }})"
    output: {type: choice, choices: [happy, sad]}
  echo:
    prompt: Echo.
    template: "{{ prompt }} {{ text }}"
    output: {type: text, max_tokens: 4}
outputs: {mood: label, echo: said}
"""


def scored(request) -> list[float]:  # noqa: ANN001 - ScoreRequest
    """"happy" wins on examples whose text is x<even number>."""
    found = re.search(r"\bx(\d+)\b", request.prompt)
    even = found is not None and int(found.group(1)) % 2 == 0
    return [-0.1 if (request.continuation.strip() == "happy") == even else -2.0]


@pytest.fixture
def plan(tmp_path: Path):  # noqa: ANN201
    rows = [{"text": f"x{i}", "topic": "t", "label": ["happy", "sad", "sad"][i % 3], "said": "text-1"} for i in range(7)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "spec.yaml").write_text(SPEC)
    return compile_spec(tmp_path / "spec.yaml")


def test_rows_scores_and_loglik_do_not_depend_on_the_batch_size(plan) -> None:  # noqa: ANN001
    examples = read_split(plan, "dev")
    backend = ScriptedBackend(logprobs=scored, text=lambda r: "text-1")
    whole = evaluate(Executor(plan, {"local": backend}), examples)
    calls = backend.usage.calls
    batched = evaluate(Executor(plan, {"local": ScriptedBackend(logprobs=scored, text=lambda r: "text-1")}), examples,
                       batch_size=3)
    assert whole.usage["local"].calls == calls and batched.model_calls > calls  # one call per node vs per batch
    assert batched.predictions == whole.predictions and batched.per_output == whole.per_output
    assert batched.loglik == pytest.approx(whole.loglik)

    # x0..x6: "happy" predicted on even texts; labels happy, sad, sad, ...
    expected_mood = [(i % 2 == 0) == (i % 3 == 0) for i in range(7)]
    assert [r["correct"] for r in whole.predictions] == expected_mood
    assert whole.correct == sum(expected_mood) and whole.total == 7 and whole.score == sum(expected_mood) / 7
    assert whole.per_output == {"echo": 1.0, "mood": sum(expected_mood) / 7}
    assert whole.predictions[1] == {
        "index": 1,
        "input": {"text": "x1", "topic": "t"},
        "target": {"echo": "text-1", "mood": "sad"},
        "prediction": {"echo": "text-1", "mood": "sad"},
        "correct": True,
    }
    assert whole.loglik is not None and whole.loglik < 0 and math.isfinite(whole.loglik)


def test_progress_reports_every_batch(plan) -> None:  # noqa: ANN001
    progress: list[tuple[int, int]] = []
    evaluate(Executor(plan, {"local": ScriptedBackend()}), read_split(plan, "dev"), batch_size=3,
             on_batch=lambda done, total: progress.append((done, total)))
    assert progress == [(3, 7), (6, 7), (7, 7)]


def test_no_examples_score_zero_without_a_call(plan) -> None:  # noqa: ANN001
    backend = ScriptedBackend()
    empty = evaluate(Executor(plan, {"local": backend}), [])
    assert (empty.total, empty.score, empty.loglik, empty.predictions, backend.usage.calls) == (0, 0.0, None, [], 0)
