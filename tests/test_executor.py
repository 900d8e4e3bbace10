"""The forward executor and the choice/text layers on the real embedded model."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime.cache import Cache, CachedBackend
from dlngraph.runtime.executor import Executor
from dlngraph.runtime.backward import run_now
from dlngraph.runtime.layers.choice import ChoiceLayer
from dlngraph.runtime.layers.text import TextLayer
from dlngraph.runtime.layers.base import Params
from dlngraph.spec import Spec

pytestmark = pytest.mark.model

INSTRUCTION = "Is the sentiment of this review positive or negative?"
SENTIMENT = {
    "prompt": INSTRUCTION,
    "template": "{{ prompt }}\n\nReview: {{ input }}\nSentiment:",
    "output": {"type": "choice", "choices": ["positive", "negative"]},
}
EXAMPLES = [
    ("I absolutely loved this film, it was wonderful!", "positive"),
    ("This was the worst meal I have ever eaten. Disgusting.", "negative"),
    ("What a fantastic, delightful experience. Highly recommended!", "positive"),
    ("Terrible service, rude staff, I hated every minute.", "negative"),
    ("The best concert of my life, pure joy.", "positive"),
    ("Awful, boring and a complete waste of money.", "negative"),
]


@pytest.fixture
def sentiment_plan(build_plan: Callable[..., ExecutionPlan]) -> ExecutionPlan:
    return build_plan(Spec(name="s", inputs=["input"], nodes={"sentiment": SENTIMENT}, outputs={"sentiment": "target"}))


def test_choice_node_classifies_obvious_sentiment(torch_backend: Backend, sentiment_plan: ExecutionPlan) -> None:
    plan = sentiment_plan
    rows = [{"input": x} for x, _ in EXAMPLES]
    record = ChoiceLayer(plan, "sentiment", torch_backend).forward(rows, Params(INSTRUCTION))
    assert record.outputs == [y for _, y in EXAMPLES]
    assert record.rendered[0].startswith(INSTRUCTION) and EXAMPLES[0][0] in record.rendered[0]
    for logprobs in record.choice_logprobs or []:
        assert sum(2.718281828 ** v for v in logprobs.values()) == pytest.approx(1.0, abs=1e-6)


def test_candidate_scoring_is_one_backend_call(
    torch_backend: Backend, response_cache: Cache, sentiment_plan: ExecutionPlan
) -> None:
    plan = sentiment_plan
    rows = [{"input": x} for x, _ in EXAMPLES[:3]]
    candidates = [Params(INSTRUCTION), Params("Say whether the review is positive or negative.")]
    items = [(p, row, y) for p in candidates for row, (_, y) in zip(rows, EXAMPLES)]
    backend = CachedBackend(torch_backend, response_cache)
    layer = ChoiceLayer(plan, "sentiment", backend)
    values = [s.logprob for s in run_now(layer.target_scores(items), backend)]
    assert backend.usage.calls == 1 and backend.usage.requests == len(items) * 2
    forward = layer.forward(rows, candidates[1])
    assert backend.usage.calls == 1  # every request was already answered
    assert values[3:] == pytest.approx([lp[y] for lp, (_, y) in zip(forward.choice_logprobs or [], EXAMPLES)])
    with pytest.raises(RuntimeFailure, match="'neutral' are not among the choices"):
        layer.target_scores([(Params(INSTRUCTION), rows[0], "neutral")])


def test_text_target_logprobs_prefers_the_likely_text(
    torch_backend: Backend, build_plan: Callable[..., ExecutionPlan]
) -> None:
    plan = build_plan(
        Spec(
            name="t",
            inputs=["input"],
            nodes={"capital": {"template": "{{ prompt }} {{ input }} is", "output": {"type": "text"}}},
            outputs={"capital": "target"},
        )
    )
    row = {"input": "France"}
    calls = torch_backend.usage.calls
    scoring = TextLayer(plan, "capital", torch_backend).target_scores(
        [(Params("The capital of"), row, "Paris"), (Params("The capital of"), row, "Banana")]
    )
    good, bad = [s.logprob for s in run_now(scoring, torch_backend)]
    assert torch_backend.usage.calls == calls + 1
    assert good > bad


def two_backend_spec() -> Spec:
    nodes = {
        "topic": {
            "backend": "a",
            "prompt": "In two words, what is the review about?",
            "template": "{{ prompt }}\nReview: {{ input }}\nTopic:",
            "output": {"type": "text", "max_tokens": 6, "stop": ["\n"]},
        },
        "sentiment": {**SENTIMENT, "backend": "b"},
        "final": {
            "backend": "a",
            "prompt": INSTRUCTION,
            "template": "{{ prompt }}\n\nReview ({{ topic }}): {{ input }}\nGuess: {{ sentiment }}\nSentiment:",
            "output": {"type": "choice", "choices": ["positive", "negative"]},
        },
    }
    return Spec(
        name="dag",
        backends={"a": {"kind": "torch", "batch_size": 4}, "b": {"kind": "torch", "batch_size": 4}},
        inputs=["input"],
        nodes=nodes,
        outputs={"final": "target"},
    )


def torch_backends(names: list[str]) -> dict[str, Backend]:
    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    return {n: TorchBackend(TorchBackendSpec(batch_size=4)) for n in names}


def test_executor_runs_stages_with_one_call_per_node_and_learned_prompts(
    build_plan: Callable[..., ExecutionPlan]
) -> None:
    plan = build_plan(two_backend_spec())
    assert [s.nodes for s in plan.forward] == [("sentiment", "topic"), ("final",)]
    backends = torch_backends(["a", "b"])
    examples = [{"input": x} for x, _ in EXAMPLES[:2]]
    result = Executor(plan, backends, prompts={"final": "Positive or negative?"}).run(examples)
    assert sorted(result.records) == ["final", "sentiment", "topic"]
    assert {n: u.calls for n, u in result.usage.items()} == {"final": 1, "sentiment": 1, "topic": 1}
    assert result.usage["topic"].completion_tokens <= 2 * 6
    final = result.records["final"]
    assert final.prompt == "Positive or negative?"
    for i, rendered in enumerate(final.rendered):
        assert rendered.startswith("Positive or negative?")
        assert f"({result.records['topic'].outputs[i]})" in rendered
        assert f"Guess: {result.records['sentiment'].outputs[i]}\n" in rendered
    assert result.records["sentiment"].outputs == ["positive", "negative"]
    assert result.outputs(1)["final"] in ("positive", "negative")


def test_executor_errors_name_the_node(torch_backend: Backend, sentiment_plan: ExecutionPlan) -> None:
    plan = sentiment_plan
    with pytest.raises(RuntimeFailure, match="node 'sentiment'.*lacks input field 'input'"):
        Executor(plan, {"local": torch_backend}).run([{"text": "no input field"}])
    with pytest.raises(RuntimeFailure, match="unknown node"):
        Executor(plan, {"local": torch_backend}, prompts={"nope": "x"})
    too_long = {"input": "word " * (torch_backend.context_length + 1)}
    with pytest.raises(RuntimeFailure, match="node 'sentiment'.*context"):
        Executor(plan, {"local": torch_backend}).run([too_long])
