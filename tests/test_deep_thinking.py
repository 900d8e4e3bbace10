"""Deep-Thinking nodes on the real embedded model (tiny demonstrations, so fast),
and on a tiny seeded random Llama where the tuned state provably changes answers.

The reference computations here call the model directly and do not use the
layer's code: plain in-context learning (demonstrations + query in one
forward, and the torch backend's own prefix-cached scoring) and the gate /
momentum updates written out from the paper's formulas. The layer scores
through the torch backend's one K/V-prefix engine (`ScoreRequest.state`), so
its choice log-probs equal the backend's exactly where the prefix is the same.

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
from dlngraph.runtime.backends.torch_backend import TorchBackend
from dlngraph.runtime import calibration
from dlngraph.runtime.backward import run_now
from dlngraph.runtime.cache import CachedBackend, MemoryCache
from dlngraph.runtime.executor import Executor
from dlngraph.runtime.kv_state import KVState, forward_with_cache
from dlngraph.runtime.layers.base import Params
from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer, state_path
from dlngraph.spec import DeepThinkingNode, Spec, TorchBackendSpec

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
                    (), False, "target", spec=spec)
    return DeepThinkingLayer(node, backend)


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
    texts, continuations = layer.queries(QUERIES)
    digest = device_backend.hold("test", state)
    requests = [ScoreRequest(t, c, state=digest) for t, cs in zip(texts, continuations) for c in cs]
    for request, score in zip(requests, device_backend.score(requests)):
        query, choice = device_backend.token_ids(request.prompt), device_backend.token_ids(request.continuation)
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids + [*query, *choice]], device=model.device)).logits[0]
        logprobs = torch.log_softmax(full.float(), dim=-1)
        expected = [float(logprobs[len(ids) + len(query) + j - 1, tok]) for j, tok in enumerate(choice)]
        assert score.token_logprobs == pytest.approx(expected, abs=LOGIT_TOLERANCE[model.dtype])


def test_one_step_choice_logprobs_match_the_backends_prefix_scoring(torch_backend) -> None:
    layer = make_layer(torch_backend, steps=1)
    texts, continuations = layer.queries(QUERIES)
    demos = layer.demo_text(DEMOS)
    scores = torch_backend.score(
        [ScoreRequest(prompt=t, continuation=c, prefix=demos) for t, cs in zip(texts, continuations) for c in cs]
    )
    ours = layer.forward(QUERIES)
    # One engine: the state of pass 1 is the demonstrations' own cache, so the
    # numbers are the backend's prefix scoring exactly, not merely close.
    assert ours.choice_logprobs == normalized(scores)
    assert ours.outputs == [max(lp, key=lp.__getitem__) for lp in ours.choice_logprobs]
    assert ours.extra == {"steps": 1, "demo_tokens": len(demo_ids(layer))}


def normalized(scores) -> list[dict[str, float]]:
    """Backend scores of (negative, positive) per query, normalized over the two."""
    out = []
    for neg, pos in zip(scores[::2], scores[1::2]):
        norm = calibration.logsumexp([neg.total, pos.total])
        out.append({"negative": neg.total - norm, "positive": pos.total - norm})
    return out


def test_zero_state_choice_logprobs_are_the_backends_plain_scoring(torch_backend) -> None:
    layer = make_layer(torch_backend)
    texts, continuations = layer.queries(QUERIES)
    plain = torch_backend.score([ScoreRequest(prompt=t, continuation=c) for t, cs in zip(texts, continuations) for c in cs])
    assert layer.choice_logprobs(None, QUERIES) == normalized(plain)


def test_state_requests_batch_and_cache_like_any_other(torch_backend) -> None:
    cached = CachedBackend(torch_backend, MemoryCache())
    layer = make_layer(cached)
    assert layer.engine is torch_backend  # the cache wrapper names its engine; states are held there
    state = layer.think(layer.demo_text(DEMOS), 2)
    deferred = layer.distributions(state, QUERIES)
    assert deferred.op == "score" and deferred.backend == "local"
    assert {r.state for r in deferred.requests} == {state.digest()}
    first = layer.choice_logprobs(state, QUERIES)
    assert cached.usage.cache_hits == 0
    assert layer.choice_logprobs(state.clone(), QUERIES) == first  # same content, same digest: from the cache
    assert cached.usage.cache_hits == len(deferred.requests)
    moved = layer.think(layer.demo_text(DEMOS), 3)
    assert moved.digest() != state.digest() and layer.choice_logprobs(moved, QUERIES) != first


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


def test_target_scores_read_the_prepared_state(torch_backend) -> None:
    layer = make_layer(torch_backend)
    record = layer.forward(QUERIES)
    scored = run_now(layer.target_scores([(Params(""), row, t) for row, t in zip(QUERIES, TARGETS)]), torch_backend)
    assert [s.logprob for s in scored] == [lp[t] for lp, t in zip(record.choice_logprobs, TARGETS)]
    assert [s.distribution for s in scored] == record.choice_logprobs
    with pytest.raises(RuntimeFailure, match="'neutral' are not among the choices"):
        layer.target_scores([(Params(""), QUERIES[0], "neutral")])


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
    pad_token_id = 0


class TinyBackend(TorchBackend):
    """The torch backend (its one scoring engine) over a seeded random 2-layer Llama."""

    def __init__(self, device: str, seed: int = 5) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        # batch_size 4: several batches, so batching is exercised too
        super().__init__(TorchBackendSpec(device=device, dtype="float32", batch_size=4))
        self.identity = "tiny-llama"
        torch.manual_seed(seed)
        # initializer_range 0.2 (not 0.02) so attention is far from uniform and
        # the demonstrations' keys/values matter to the answer.
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.2)
        self._loaded = (LlamaForCausalLM(config).eval().to(device), AsciiTokenizer())

    def token_ids(self, text: str) -> tuple[int, ...]:
        return tuple(ord(c) % 128 for c in text)


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
                    "target", spec=spec)
    return DeepThinkingLayer(node, TinyBackend(device))


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
    record = layer.forward(TINY_ROWS)
    assert record.choice_logprobs == calibrated_by_hand(layer, state)
    # The prior is the state's own: another T gives another prior.
    plain = layer.think(layer.demo_text(layer.demonstrations()), 1)
    assert content_free_prior(layer, plain) != content_free_prior(layer, state)
    assert layer.choice_logprobs(plain, TINY_ROWS) == calibrated_by_hand(layer, plain)


def content_free_prior(layer: DeepThinkingLayer, state: KVState) -> dict[str, float]:
    content_free = layer.choice_logprobs(state, [{"input": t} for t in calibration.CONTENT_FREE], calibrated=False)
    return {c: sum(d[c] for d in content_free) / len(content_free) for c in ("x", "y")}


def calibrated_by_hand(layer: DeepThinkingLayer, state: KVState) -> list[dict[str, float]]:
    """The calibration done by hand on separately scored rows. The layer scores
    rows and content-free rows in one call, batched otherwise: float32 agrees to 1e-6."""
    prior = content_free_prior(layer, state)
    out = []
    for r in layer.choice_logprobs(state, TINY_ROWS, calibrated=False):
        shifted = {c: r[c] - prior[c] for c in r}
        norm = torch.logsumexp(torch.tensor(list(shifted.values()), dtype=torch.float64), 0).item()
        out.append(pytest.approx({c: v - norm for c, v in shifted.items()}, abs=1e-6))
    return out


def test_batch_calibration_needs_train_inputs(device: str) -> None:
    layer = tiny_layer(device, calibration="batch")
    with pytest.raises(RuntimeFailure, match="batch calibration needs the train split"):
        layer.forward(TINY_ROWS[:2])


def test_thinking_longer_than_the_context_is_refused_with_the_node(device: str) -> None:
    long_demos = [{"input": "ab" * 50, "target": "x"}, {"input": "cd" * 50, "target": "y"}]
    layer = tiny_layer(device, demonstrations={"examples": long_demos})
    twice = 2 * len(layer.engine.token_ids(layer.demo_text(long_demos)))  # 2 x (2 x (100 + 2) + 2 x 2) = 416
    with pytest.raises(RuntimeFailure, match=rf"thinking \(the demonstrations twice\) is {twice} tokens long, more "
                                             r"than the model's context of 256") as caught:
        layer.forward(TINY_ROWS)
    assert caught.value.node == "answer" and "fewer or shorter demonstrations" in str(caught.value)
