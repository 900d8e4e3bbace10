"""Deep-Thinking nodes on the real embedded model (tiny demonstrations, so fast).

The reference computations here call the model directly and do not use the
layer's code: plain in-context learning (demonstrations + query in one
forward, and the torch backend's own prefix-cached scoring) and the gate /
momentum updates written out from the paper's formulas.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from dlngraph.compiler.plan import PlanNode
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import ScoreRequest
from dlngraph.runtime.executor import Executor
from dlngraph.runtime.kv_state import KVState
from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer, prefix_hidden, state_path
from dlngraph.spec import DeepThinkingNode, Spec

pytestmark = pytest.mark.model

DEMOS = [
    {"input": "a wonderful gift", "target": "positive"},
    {"input": "deeply troubling", "target": "negative"},
    {"input": "warmly welcomed", "target": "positive"},
    {"input": "a grave mistake", "target": "negative"},
]
QUERIES = [{"input": "very pleased"}, {"input": "strongly condemned"}, {"input": "a fine idea"}]
TARGETS = ["positive", "negative", "positive"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These forwards are tiny: on a shared 2-core machine a second thread only
    adds contention (about 3x slower under load), so run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def node_spec(**changes: object) -> DeepThinkingNode:
    fields: dict[str, object] = {
        "kind": "deep_thinking",
        "demonstrations": {"examples": DEMOS},
        "demo_template": "Phrase: {{ input }}\nSentiment: {{ label }}",
        "template": "Phrase: {{ input }}\nSentiment:",
        "choices": ["negative", "positive"],
        "eta": 0.3,
        "beta": 0.9,
        "steps": 2,
    }
    fields.update(changes)
    return DeepThinkingNode.model_validate(fields)


def make_layer(backend, **changes: object) -> DeepThinkingLayer:
    spec = node_spec(**changes)
    node = PlanNode("answer", "deep_thinking", "local", "torch", "choice", tuple(spec.choices), (), ("input",),
                    (), False, "target")
    return DeepThinkingLayer(node, spec, backend)


def demo_ids(layer: DeepThinkingLayer) -> list[int]:
    return list(layer.backend.token_ids(layer.demo_text(DEMOS)))


def reference_states(model, ids: list[int], eta: float, beta: float, steps: int) -> list[torch.Tensor]:
    """K and V of every layer after `steps` passes, from the paper's formulas.

    beta == 0 uses the gate form K_t = eta*K_new + (1-eta)*K_{t-1}; otherwise
    the momentum form m_t = g_t + beta*m_{t-1} (m_1 = g_1), K_t = K_{t-1} + eta*m_t.
    """
    x = torch.tensor([ids])
    n = len(ids)
    with torch.no_grad():
        out = model(input_ids=x, past_key_values=DynamicCache(), use_cache=True)
        state = [layer.keys.clone() for layer in out.past_key_values.layers]
        state += [layer.values.clone() for layer in out.past_key_values.layers]
        momentum = None
        layers = len(state) // 2
        for _ in range(steps - 1):
            past = DynamicCache()
            for i in range(layers):
                past.update(state[i].clone(), state[layers + i].clone(), i)
            # Passes >= 2 see the demonstrations at positions n..2n-1 with an all-ones mask.
            out = model(input_ids=x, attention_mask=torch.ones(1, 2 * n, dtype=torch.long),
                        position_ids=torch.arange(n, 2 * n)[None], past_key_values=past, use_cache=True)
            new = [layer.keys[:, :, n:] for layer in out.past_key_values.layers]
            new += [layer.values[:, :, n:] for layer in out.past_key_values.layers]
            if beta == 0:
                state = [eta * k_new + (1 - eta) * k for k_new, k in zip(new, state)]
            else:
                grads = [k_new - k for k_new, k in zip(new, state)]
                momentum = grads if momentum is None else [g + beta * m for g, m in zip(grads, momentum)]
                state = [k + eta * m for k, m in zip(state, momentum)]
    return state


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_one_step_is_plain_in_context_learning(torch_backend) -> None:
    layer = make_layer(torch_backend)
    ids = demo_ids(layer)
    state = layer.think(layer.demo_text(DEMOS), 1)
    assert state.length == len(ids) and state.meta.steps == 1
    model = torch_backend.model
    for row in QUERIES:
        query = list(torch_backend.token_ids(layer.queries([row])[0][0]))
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids + query])).logits[0, len(ids):]
            hidden, _ = prefix_hidden(model, state, [query])
            from_state = model.get_output_embeddings()(hidden)[0]
        assert float((full - from_state).abs().max()) < 1e-4


def test_one_step_choice_logprobs_match_the_backends_prefix_scoring(torch_backend) -> None:
    layer = make_layer(torch_backend, steps=1)
    texts, continuations = layer.queries(QUERIES)
    demos = layer.demo_text(DEMOS)
    scores = torch_backend.score(
        [ScoreRequest(prompt=t, continuation=c, prefix=demos) for t, cs in zip(texts, continuations) for c in cs]
    )
    ours = layer.forward(QUERIES)
    for i, lp in enumerate(ours.choice_logprobs):
        totals = torch.tensor([scores[2 * i].total, scores[2 * i + 1].total], dtype=torch.float64)
        expected = (totals - torch.logsumexp(totals, 0)).tolist()
        assert [lp["negative"], lp["positive"]] == pytest.approx(expected, abs=1e-4)
    assert ours.outputs == [max(lp, key=lp.__getitem__) for lp in ours.choice_logprobs]
    assert ours.extra == {"steps": 1, "demo_tokens": len(demo_ids(layer))}


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_thinking_matches_the_gate_and_momentum_formulas(torch_backend, beta: float) -> None:
    layer = make_layer(torch_backend, beta=beta)
    ids = demo_ids(layer)
    state = layer.think(layer.demo_text(DEMOS), 3)
    ours = state.keys + state.values
    expected = reference_states(torch_backend.model, ids, eta=0.3, beta=beta, steps=3)
    assert max_diff(ours, expected) < 1e-5
    # ...and thinking moved the state away from plain in-context learning.
    plain = reference_states(torch_backend.model, ids, eta=0.3, beta=beta, steps=1)
    assert max_diff(ours, plain) > 1e-2


def test_momentum_differs_from_the_gate_form(torch_backend) -> None:
    text = make_layer(torch_backend).demo_text(DEMOS)
    gate = make_layer(torch_backend, beta=0.0).think(text, 3)
    momentum = make_layer(torch_backend, beta=0.9).think(text, 3)
    assert max_diff(gate.keys, momentum.keys) > 1e-3


def test_save_load_round_trip_is_exact(torch_backend, tmp_path: Path) -> None:
    layer = make_layer(torch_backend)
    state = layer.think(layer.demo_text(DEMOS), 2)
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = KVState.load(path)
    assert loaded.meta == state.meta
    assert len(loaded.keys) == len(state.keys) == torch_backend.model.config.num_hidden_layers
    for a, b in zip(state.keys + state.values, loaded.keys + loaded.values):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)


def test_prepare_saves_then_loads_instead_of_thinking(torch_backend, tmp_path: Path, monkeypatch) -> None:
    first = make_layer(torch_backend)
    first.prepare(run_dir=tmp_path)
    assert state_path(tmp_path, "answer").is_file()
    expected = first.forward(QUERIES).choice_logprobs

    second = make_layer(torch_backend)
    monkeypatch.setattr(second, "think_steps", lambda text: pytest.fail("thought instead of loading"))
    second.prepare(run_dir=tmp_path)
    assert second.forward(QUERIES).choice_logprobs == expected


def test_changed_demonstrations_are_refused(torch_backend, tmp_path: Path) -> None:
    make_layer(torch_backend).prepare(run_dir=tmp_path)
    changed = [*DEMOS[:-1], {"input": "a grave mistake", "target": "positive"}]
    with pytest.raises(RuntimeFailure, match="demonstrations changed") as caught:
        make_layer(torch_backend, demonstrations={"examples": changed}).prepare(run_dir=tmp_path)
    assert caught.value.node == "answer" and "delete the file" in str(caught.value)
    with pytest.raises(RuntimeFailure, match="eta: saved 0.3, now 0.5"):
        make_layer(torch_backend, eta=0.5).prepare(run_dir=tmp_path)


def test_select_steps_evaluates_each_step_of_one_run_on_dev(torch_backend) -> None:
    layer = make_layer(torch_backend, steps=None, max_steps=3)
    calls: list[int] = []
    think_steps = layer.think_steps

    def counted(text: str):
        calls.append(1)
        yield from think_steps(text)

    layer.think_steps = counted  # type: ignore[method-assign]
    state = layer.prepare(dev_rows=QUERIES, dev_targets=TARGETS)
    assert calls == [1]  # one thinking run for all of T = 1..3
    assert [p.steps for p in layer.curve] == [1, 2, 3]
    best = max(layer.curve, key=lambda p: (p.accuracy, p.mean_target_logprob))
    assert state.meta.steps == best.steps
    again = make_layer(torch_backend, steps=best.steps).think(layer.demo_text(DEMOS), best.steps)
    assert max_diff(state.keys + state.values, again.keys + again.values) == 0.0


def test_executor_runs_a_deep_thinking_node(torch_backend, build_plan) -> None:
    spec = Spec.model_validate(
        {
            "name": "dt",
            "inputs": ["input"],
            "nodes": {"answer": node_spec().model_dump(exclude_defaults=False)},
            "outputs": {"answer": "target"},
        }
    )
    result = Executor(build_plan(spec), {"local": torch_backend}).run(QUERIES)
    record = result.records["answer"]
    assert record.outputs and set(record.outputs) <= {"negative", "positive"}
    for lp in record.choice_logprobs or []:
        assert torch.logsumexp(torch.tensor(list(lp.values())), 0).item() == pytest.approx(0.0, abs=1e-6)
    assert record.extra["steps"] == 2


def test_target_logprobs_read_the_prepared_state(torch_backend) -> None:
    layer = make_layer(torch_backend)
    record = layer.forward(QUERIES)
    assert layer.target_logprobs(QUERIES, TARGETS) == [lp[t] for lp, t in zip(record.choice_logprobs, TARGETS)]
    with pytest.raises(RuntimeFailure, match="'neutral' are not among the choices"):
        layer.target_logprobs(QUERIES[:1], ["neutral"])


def test_composed_spec_draws_demonstrations_from_the_plan_and_needs_upstream_dev_rows(torch_backend) -> None:
    from dlngraph.compiler.pipeline import compile_unit
    from dlngraph.runtime.data import read_jsonl

    plan = compile_unit(Path(__file__).parents[1] / "specs/rewrite-then-think.yaml").plan
    layer = DeepThinkingLayer.from_plan(plan, "answer", torch_backend)
    assert layer.node.parents == ("rewrite",)
    demos = layer.demonstrations()
    train = read_jsonl(plan.data_paths["train"], ["input", "target"])
    assert len(demos) == 8 and all(d in train for d in demos)
    assert layer.demonstrations() == demos  # the seed fixes the draw
    with pytest.raises(RuntimeFailure, match="outputs of the upstream node"):
        layer.prepare()  # T is selected on dev, whose rows need the rewrite layer's outputs


def test_a_file_that_is_not_a_state_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(RuntimeFailure, match="is not a Deep-Thinking state"):
        KVState.load(path)
    save_file({"k.0": torch.zeros(1)}, str(path), metadata={"format": "dlngraph-deep-thinking/1"})
    with pytest.raises(RuntimeFailure, match="could not read Deep-Thinking state"):
        KVState.load(path)
