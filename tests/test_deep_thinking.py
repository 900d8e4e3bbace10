"""Deep-Thinking nodes on the real embedded model (tiny demonstrations, so fast),
and on a tiny seeded random Llama where the tuned state provably changes answers.

The reference computations here call the model directly and do not use the
layer's code: plain in-context learning (demonstrations + query in one
forward, and the torch backend's own prefix-cached scoring) and the gate /
momentum updates written out from the paper's formulas.

Tests taking `device_backend` run on CPU (float32) and, where torch sees a GPU,
on CUDA (bfloat16, the default there). Tolerances per dtype: float32 logits
and states agree to 1e-4 / 1e-5; in bfloat16 the model's own arithmetic keeps
8 bits of mantissa, so a plain forward and a cached one agree to 0.25 on
logits and the reference update (also fp32 state, bf16 forwards) to 2% of the
largest |K|, |V|. The state itself is always float32 (small steps vanish in
bf16, DEEP_THINKING.md), so a save/load round trip is exact on every device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from dlngraph.compiler.plan import NodeKind, PlanNode
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import ScoreRequest
from dlngraph.runtime import calibration
from dlngraph.runtime.executor import Executor
from dlngraph.runtime.kv_state import KVState, forward_with_cache
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
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}
STATE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # float32: absolute; bfloat16: of max |K|, |V|


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
    node = PlanNode("answer", NodeKind.DEEP_THINKING, "local", "torch", "choice", tuple(spec.choices), (), ("input",),
                    (), False, "target")
    return DeepThinkingLayer(node, spec, backend)


def demo_ids(layer: DeepThinkingLayer) -> list[int]:
    return list(layer.backend.token_ids(layer.demo_text(DEMOS)))


def reference_states(model, ids: list[int], eta: float, beta: float, steps: int) -> list[torch.Tensor]:
    """K and V of every layer after `steps` passes, from the paper's formulas (fp32 state).

    beta == 0 uses the gate form K_t = eta*K_new + (1-eta)*K_{t-1}; otherwise
    the momentum form m_t = g_t + beta*m_{t-1} (m_1 = g_1), K_t = K_{t-1} + eta*m_t.
    """
    x = torch.tensor([ids])
    n = len(ids)
    with torch.no_grad():
        _, cache = forward_with_cache(model, x, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], DynamicCache())
        state = [layer.keys.float() for layer in cache.layers]
        state += [layer.values.float() for layer in cache.layers]
        momentum = None
        layers = len(state) // 2
        for _ in range(steps - 1):
            past = DynamicCache()
            for i in range(layers):
                past.update(state[i].to(model.dtype), state[layers + i].to(model.dtype), i)
            # Passes >= 2 see the demonstrations at positions n..2n-1 with an all-ones mask.
            _, out = forward_with_cache(model, x, torch.ones(1, 2 * n, dtype=torch.long),
                                        torch.arange(n, 2 * n)[None], past)
            new = [layer.keys[:, :, n:].float() for layer in out.layers]
            new += [layer.values[:, :, n:].float() for layer in out.layers]
            if beta == 0:
                state = [eta * k_new + (1 - eta) * k for k_new, k in zip(new, state)]
            else:
                grads = [k_new - k for k_new, k in zip(new, state)]
                momentum = grads if momentum is None else [g + beta * m for g, m in zip(grads, momentum)]
                state = [k + eta * m for k, m in zip(state, momentum)]
    return state


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_one_step_is_plain_in_context_learning(device_backend) -> None:
    layer = make_layer(device_backend)
    ids = demo_ids(layer)
    state = layer.think(layer.demo_text(DEMOS), 1)
    assert state.length == len(ids) and state.meta.steps == 1
    model = device_backend.model
    for row in QUERIES:
        query = list(device_backend.token_ids(layer.queries([row])[0][0]))
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids + query], device=model.device)).logits[0, len(ids):]
            hidden, _ = prefix_hidden(model, state, [query])
            from_state = model.get_output_embeddings()(hidden)[0]
        assert float((full.float() - from_state.float()).abs().max()) < LOGIT_TOLERANCE[model.dtype]


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
def test_thinking_matches_the_gate_and_momentum_formulas(device_backend, beta: float) -> None:
    layer = make_layer(device_backend, beta=beta)
    ids = demo_ids(layer)
    state = layer.think(layer.demo_text(DEMOS), 3)
    ours = state.keys + state.values
    assert all(t.dtype == torch.float32 for t in ours)
    model = device_backend.model
    expected = reference_states(model, ids, eta=0.3, beta=beta, steps=3)
    scale = 1.0 if model.dtype == torch.float32 else max(float(t.abs().max()) for t in expected)
    assert max_diff(ours, expected) < STATE_TOLERANCE[model.dtype] * scale
    # ...and thinking moved the state away from plain in-context learning.
    plain = reference_states(model, ids, eta=0.3, beta=beta, steps=1)
    assert max_diff(ours, plain) > 1e-2
    # Each pass's relative change is recorded: passes 2 and 3, both K and V moved.
    assert [c.steps for c in layer.changes] == [2, 3]
    assert all(c.key_update > 0 and c.value_update > 0 for c in layer.changes)
    first = layer.changes[0]  # m = g on the first update, so the step is eta * g
    assert first.key_update == pytest.approx(0.3 * first.key_gradient, rel=1e-6)


def test_momentum_differs_from_the_gate_form(torch_backend) -> None:
    text = make_layer(torch_backend).demo_text(DEMOS)
    gate = make_layer(torch_backend, beta=0.0).think(text, 3)
    momentum = make_layer(torch_backend, beta=0.9).think(text, 3)
    assert max_diff(gate.keys, momentum.keys) > 1e-3


def test_save_load_round_trip_is_exact(device_backend, tmp_path: Path) -> None:
    layer = make_layer(device_backend)
    state = layer.think(layer.demo_text(DEMOS), 2)
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = KVState.load(path)
    assert loaded.meta == state.meta
    assert len(loaded.keys) == len(state.keys) == device_backend.model.config.num_hidden_layers
    for a, b in zip(state.keys + state.values, loaded.keys + loaded.values):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a.cpu(), b)
    # ...and answering from the loaded state gives the same scores.
    layer.state = loaded
    again = layer.choice_logprobs(loaded, QUERIES)
    assert again == layer.choice_logprobs(state, QUERIES)


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


# ---------------------------------------------------------------------- a tiny random model


class AsciiTokenizer:
    """One token per character: enough for a model that was never trained on text."""

    name_or_path = "ascii"

    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(ord(c) % 128 for c in text)


class TinyBackend:
    """The interface DeepThinkingLayer needs, over a seeded random 2-layer Llama."""

    identity = "tiny-llama"

    def __init__(self, device: str, seed: int = 5) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        # initializer_range 0.2 (not 0.02) so attention is far from uniform and
        # the demonstrations' keys/values matter to the answer.
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.2)
        self.model = LlamaForCausalLM(config).eval().to(device)
        self.tokenizer = AsciiTokenizer()

    def token_ids(self, text: str) -> tuple[int, ...]:
        return self.tokenizer.ids(text)

    def rows_per_batch(self, tokens_per_row: int) -> int:
        return 4  # several batches, so batching is exercised too


TINY_ROWS = [{"input": s} for s in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]


def tiny_layer(device: str, **changes: object) -> DeepThinkingLayer:
    fields: dict[str, object] = {
        "demonstrations": {"examples": [{"input": "ab", "target": "x"}, {"input": "cd", "target": "y"}]},
        "demo_template": "{{ input }}={{ label }}",
        "template": "{{ input }}=",
        "choices": ["x", "y"],
        "eta": 0.5,
        "beta": 0.0,
        "steps": 3,
    }
    fields.update(changes)
    spec = DeepThinkingNode.model_validate({"kind": "deep_thinking", **fields})
    node = PlanNode("answer", NodeKind.DEEP_THINKING, "local", "torch", "choice", ("x", "y"), (), ("input",), (), False,
                    "target")
    return DeepThinkingLayer(node, spec, TinyBackend(device))


def test_thinking_changes_predictions_of_a_small_model(device: str) -> None:
    layer = tiny_layer(device)
    text = layer.demo_text(layer.demonstrations())
    record = layer.forward(TINY_ROWS)
    assert record.extra["steps"] == 3  # the spec's fixed T
    plain = layer.choice_logprobs(layer.think(text, 1), TINY_ROWS)
    tuned = layer.choice_logprobs(layer.think(text, 3), TINY_ROWS)
    flips = [i for i, (a, b) in enumerate(zip(plain, tuned)) if max(a, key=a.get) != max(b, key=b.get)]
    # A real change, not a near-tie nudged over the line: each flipped answer
    # moves its margin by more than 0.2 nats.
    moved = [i for i in flips if abs((plain[i]["x"] - plain[i]["y"]) - (tuned[i]["x"] - tuned[i]["y"])) > 0.2]
    assert moved, f"no prediction changed: {plain} -> {tuned}"
    assert record.outputs == [max(lp, key=lp.get) for lp in tuned]
    assert layer.changes and all(c.key_update > 0 for c in layer.changes)


def test_contextual_calibration_divides_out_the_states_own_label_prior(device: str) -> None:
    layer = tiny_layer(device, calibration="contextual")
    state = layer.think(layer.demo_text(layer.demonstrations()), 3)
    layer.state = state
    raw = layer.choice_logprobs(state, TINY_ROWS)
    content_free = layer.choice_logprobs(state, [{"input": t} for t in calibration.CONTENT_FREE])
    prior = {c: sum(d[c] for d in content_free) / len(content_free) for c in ("x", "y")}
    record = layer.forward(TINY_ROWS)
    for got, r in zip(record.choice_logprobs or [], raw):
        shifted = {c: r[c] - prior[c] for c in r}
        norm = torch.logsumexp(torch.tensor(list(shifted.values()), dtype=torch.float64), 0).item()
        assert got == pytest.approx({c: v - norm for c, v in shifted.items()}, abs=1e-9)
    # The prior is the state's own: another T gives another prior.
    assert layer.label_prior(layer.think(layer.demo_text(layer.demonstrations()), 1)) != prior


def test_batch_calibration_needs_train_inputs(device: str) -> None:
    layer = tiny_layer(device, calibration="batch")
    with pytest.raises(RuntimeFailure, match="batch calibration needs the train split"):
        layer.forward(TINY_ROWS[:2])
