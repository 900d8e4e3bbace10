"""The torch backend on the real embedded model: scoring equals a plain
forward, generation is seeded and stops where asked, bad models fail clearly.

Tests taking `device_backend` run on CPU (float32) and, where torch sees a GPU,
on CUDA (bfloat16, its default dtype). Tolerances per dtype, on log-probs:
float32 agrees to 1e-4 whatever the batching; bfloat16 keeps 8 bits of
mantissa, and a padded batch sums in another order than a single row, so
batched and unbatched agree only to 0.15 there.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import GenerateRequest, ScoreRequest
from dlngraph.runtime.backends.torch_backend import Encoded, TorchBackend
from dlngraph.runtime.kv_state import KVState, StateMeta
from dlngraph.spec import TorchBackendSpec

pytestmark = pytest.mark.model

INSTRUCTION = "Decide whether the review is positive or negative.\n\n"
REVIEWS = ["A wonderful, moving film.", "Dull, far too long and badly acted; I left early.", "Fine."]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.05}


def plain_logprobs(backend: TorchBackend, request: ScoreRequest, before: tuple[int, ...] = ()) -> list[float]:
    """Log-probs of the continuation from one unbatched, uncached forward (after the ids `before`)."""
    encoded = backend.encode(request)
    encoded = Encoded(before + encoded.prefix, encoded.prompt, encoded.continuation)
    with torch.inference_mode():
        logits = backend.model(torch.tensor([encoded.ids], device=backend.device)).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    start = len(encoded.prefix) + len(encoded.prompt)
    return [float(logprobs[start + j - 1, tok]) for j, tok in enumerate(encoded.continuation)]


def test_batched_prefix_reuse_scoring_matches_plain_forward(device_backend: TorchBackend) -> None:
    torch_backend = device_backend
    tolerance = TOLERANCE[torch_backend.dtype]
    requests = [
        ScoreRequest(prompt=f"Review: {text}\nSentiment:", continuation=choice, prefix=INSTRUCTION)
        for text in REVIEWS
        for choice in (" positive", " negative", " mixed, leaning to neither side")
    ]
    requests += [
        ScoreRequest(prompt="Review: Great.\nSentiment:", continuation=" positive"),  # no prefix
        ScoreRequest(prompt="", continuation="Hello there"),  # nothing before the continuation
        ScoreRequest(prompt="Empty:", continuation="", prefix=INSTRUCTION),
    ]
    scores = torch_backend.score(requests)
    assert len(scores) == len(requests)
    for request, score in zip(requests, scores):
        expected = plain_logprobs(torch_backend, request)
        assert len(score.token_logprobs) == len(expected)
        assert score.token_logprobs == pytest.approx(expected, abs=tolerance)
    assert scores[-1].token_logprobs == ()


def test_score_order_and_duplicates_do_not_matter(device_backend: TorchBackend) -> None:
    torch_backend = device_backend
    tolerance = TOLERANCE[torch_backend.dtype] / 10
    a = ScoreRequest(prompt="Review: Great fun.\nSentiment:", continuation=" positive", prefix=INSTRUCTION)
    b = ScoreRequest(prompt="Review: Boring.\nSentiment:", continuation=" negative", prefix=INSTRUCTION)
    forward = torch_backend.score([a, b, a])
    backward = torch_backend.score([b, a])
    assert forward[0].token_logprobs == pytest.approx(backward[1].token_logprobs, abs=tolerance)
    assert forward[2].token_logprobs == pytest.approx(forward[0].token_logprobs, abs=tolerance)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(device_backend: TorchBackend) -> None:
    torch_backend = device_backend
    story = GenerateRequest("Once upon a time, a small robot", max_tokens=12, temperature=1.0, seed=7, n=2)
    other = GenerateRequest("The recipe calls for", max_tokens=8, temperature=0.9, seed=1)
    first = torch_backend.generate([story, other])
    again = torch_backend.generate([story, other])
    alone = torch_backend.generate([story])
    assert first == again
    assert alone[0].texts == first[0].texts
    reseeded = torch_backend.generate([GenerateRequest(story.prompt, 12, 1.0, seed=8, n=2)])
    assert reseeded[0].texts != first[0].texts


def test_rows_sharing_a_prompt_are_prefilled_once_with_unchanged_samples(
    device_backend: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_backend = device_backend
    prompt = "Write a short reason why the film was good:"
    requests = [GenerateRequest(prompt, 10, 0.8, seed=s) for s in (1, 2, 3)] + [GenerateRequest("Name a fruit:", 6)]
    alone = [torch_backend.generate([r])[0] for r in requests]
    widths: list[tuple[int, int]] = []
    hidden = torch_backend._hidden
    monkeypatch.setattr(torch_backend, "_hidden", lambda ids, *a: widths.append(tuple(ids.shape)) or hidden(ids, *a))
    together = torch_backend.generate(requests)
    assert widths[0][0] == 2 and all(rows == 4 for rows, _ in widths[1:])  # 2 distinct prompts prefilled, 4 rows decoded
    assert together == alone


def test_greedy_generation_honours_stop_and_max_tokens(device_backend: TorchBackend) -> None:
    torch_backend = device_backend
    listing = GenerateRequest("Three fruits:\n1. apple\n2.", max_tokens=30, stop=("\n",))
    short = GenerateRequest("Count: one, two, three,", max_tokens=3)
    out = torch_backend.generate([listing, short])
    assert "\n" not in out[0].texts[0] and out[0].texts[0].strip()
    assert 1 <= out[1].completion_tokens <= 3
    assert torch_backend.generate([short]) == [out[1]]


def test_request_longer_than_context_is_a_clear_error(torch_backend: TorchBackend) -> None:
    long_prompt = "word " * (torch_backend.context_length + 10)
    with pytest.raises(RuntimeFailure, match="more than the model's context"):
        torch_backend.score([ScoreRequest(prompt=long_prompt, continuation=" yes")])


def test_chat_mode_wraps_the_prompt_and_keeps_the_prefix_shared(torch_backend: TorchBackend) -> None:
    chat = TorchBackend(TorchBackendSpec(chat=True, batch_size=8))
    request = ScoreRequest(prompt="Review: Lovely.\nSentiment:", continuation="positive", prefix=INSTRUCTION)
    encoded = chat.encode(request)
    prefix_text = chat.tokenizer.decode(encoded.prefix)
    assert "<|im_start|>user" in prefix_text and prefix_text.endswith(INSTRUCTION)
    assert "<|im_start|>assistant" in chat.tokenizer.decode(encoded.prompt)
    assert chat.identity != torch_backend.identity
    assert chat.score([request])[0].token_logprobs == pytest.approx(plain_logprobs(chat, request), abs=1e-4)


def test_requests_after_a_held_kv_state_read_on_from_it(torch_backend: TorchBackend) -> None:
    demos = "Review: Great fun.\nSentiment: positive\n\n"
    ids = torch_backend.token_ids(demos)
    meta = StateMeta("n", torch_backend.identity, torch_backend.tokenizer_name(), 0.1, 0.9, 1, len(ids), "float32", "-")
    state = KVState(*torch_backend.kv_forward(ids, None), meta)
    digest = torch_backend.hold("test", state)
    requests = [ScoreRequest(prompt=f"Review: {text}\nSentiment:", continuation=" positive", prefix=p, state=digest)
                for text in REVIEWS for p in ("", INSTRUCTION)]
    for request, score in zip(requests, torch_backend.score(requests)):
        # The state's ids, then prefix, prompt and continuation, in one plain forward.
        expected = plain_logprobs(torch_backend, replace(request, state=""), before=ids)
        assert score.token_logprobs == pytest.approx(expected, abs=1e-4)
    with pytest.raises(RuntimeFailure, match="no K/V state"):
        torch_backend.score([ScoreRequest("x", " y", state="0" * 64)])
    with pytest.raises(RuntimeFailure, match="needs a prompt"):
        torch_backend.score([ScoreRequest("", " y", state=digest)])
    chat = TorchBackend(TorchBackendSpec(chat=True, batch_size=8))
    assert chat.encode(requests[0]).prompt == torch_backend.token_ids(requests[0].prompt)  # a state reads plain text


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="no config.json"):
        TorchBackend(TorchBackendSpec(model=str(tmp_path / "nowhere")))


def test_directory_that_is_not_a_causal_lm_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    backend = TorchBackend(TorchBackendSpec(model=str(tmp_path)))
    with pytest.raises(RuntimeFailure, match="could not load a causal language model"):
        backend.score([ScoreRequest(prompt="a", continuation="b")])


def test_static_cache_decoding_gives_the_dynamic_paths_samples(device_backend: TorchBackend) -> None:
    """The static-cache decoder (eager here; CUDA graphs compile the same steps
    on a GPU) generates exactly what the growing dynamic cache does."""
    from dlngraph.runtime.backends.static_decode import StaticDecoder

    requests = [
        GenerateRequest("Once upon a time, a small robot", max_tokens=10, temperature=0.9, seed=3, n=2),
        GenerateRequest("Three fruits:\n1. apple\n2.", max_tokens=12, stop=("\n",)),
        GenerateRequest("Name a colour:", max_tokens=5),
    ]
    dynamic = TorchBackend(TorchBackendSpec(device=device_backend.device.type, compile=False, batch_size=8))
    expected = dynamic.generate(requests)
    static = TorchBackend(TorchBackendSpec(device=device_backend.device.type, compile=False, batch_size=8))
    static._decoder = StaticDecoder(static.model, compiled=False)
    assert static.generate(requests) == expected
    greedy = [GenerateRequest("Count: one, two, three,", max_tokens=6), GenerateRequest("The sky is", max_tokens=4)]
    assert static.generate(greedy) == dynamic.generate(greedy)


@pytest.mark.cuda
def test_compiled_decoding_on_cuda_matches_eager(device: str) -> None:
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    requests = [GenerateRequest("Count: one, two, three,", max_tokens=8), GenerateRequest("The sky is", max_tokens=8)]
    eager = TorchBackend(TorchBackendSpec(device="cuda", compile=False)).generate(requests)
    compiled = TorchBackend(TorchBackendSpec(device="cuda"))
    assert compiled._static_decoder() is not None
    out = compiled.generate(requests)
    assert not compiled._compile_failed, "torch.compile failed; see the log"
    # bf16 arithmetic differs between fused (compiled) and eager kernels: same
    # lengths and a shared start, not bit-identical greedy text.
    for a, b in zip(out, eager):
        assert a.completion_tokens == b.completion_tokens and a.texts[0][:8] == b.texts[0][:8]


def test_no_deprecation_warnings_from_our_model_calls(torch_backend: TorchBackend) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        torch_backend.score([ScoreRequest(prompt="Review: Fine.\nSentiment:", continuation=" positive", prefix=INSTRUCTION)])
        torch_backend.generate([GenerateRequest("Hello", max_tokens=2)])


def test_dtype_and_batch_size_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlngraph.runtime.backends import torch_backend as module

    assert module.resolve_dtype("auto", "cpu") == "float32"
    assert module.resolve_dtype("auto", "cuda") == "bfloat16"
    assert module.resolve_dtype("float16", "cuda") == "float16"
    cpu = TorchBackend(TorchBackendSpec(device="cpu"))
    assert cpu.identity.endswith("|float32|plain")
    assert cpu.rows_per_batch(100) == module.CPU_BATCH
    assert TorchBackend(TorchBackendSpec(device="cpu", batch_size=3)).rows_per_batch(100) == 3
    # On CUDA the batch follows free memory: pretend the model sits on a GPU.
    monkeypatch.setattr(TorchBackend, "device", property(lambda self: torch.device("cuda")))
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * free["bytes"]))
    per_row = cpu._bytes_per_row(200)
    free["bytes"] = 40 * per_row * 2  # half of it holds 40 rows of 200 tokens
    assert cpu.rows_per_batch(200) == 40
    assert cpu.rows_per_batch(800) == module.CPU_BATCH  # longer rows: fewer fit, never below the CPU batch
    free["bytes"] = 10_000 * per_row
    assert cpu.rows_per_batch(200) == module.GPU_MAX_BATCH
