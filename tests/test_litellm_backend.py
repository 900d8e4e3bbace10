"""The litellm backend against a scripted OpenAI server on loopback (tests/fake_openai.py):
retries with backoff, the max_errors budget, API-key handling, the concurrency
limit, top-k choice scoring, capability probing and its use by the compiler,
and the Router over two deployments. The real llama.cpp server is in
test_litellm_server.py."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlngraph.capabilities import Capability
from dlngraph.errors import RuntimeFailure, SpecError
from dlngraph.runtime.backends.base import GenerateRequest, ScoreRequest
from dlngraph.runtime.backends.litellm_backend import LiteLLMBackend, probe_backend
from dlngraph.runtime.backends.probe import probe_path
from dlngraph.spec import Deployment, LiteLLMBackendSpec

from fake_openai import TOP, FakeOpenAI

SECRET = "sk-test-never-stored-0123456789"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Probe results and the response cache go to the test's own directory."""
    monkeypatch.setenv("DLNGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def embedded_tokenizer() -> str:
    """The converted embedded model's directory in the user cache (made once, ~15 s)."""
    from dlngraph.runtime.models import ModelSource, model_directory

    return str(model_directory(ModelSource.resolve("embedded")))


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def backend(api_base: str, **fields: object) -> LiteLLMBackend:
    fields = {"backoff": 0.01, "capabilities": ["generate", "top_logprobs"], **fields}
    return LiteLLMBackend(LiteLLMBackendSpec(model="openai/fake", api_base=api_base, **fields))


# --------------------------------------------------------------------------- calls


def test_generate_batch_counts_tokens_and_sends_sampling_parameters(fake: FakeOpenAI) -> None:
    b = backend(fake.api_base)
    out = b.generate([GenerateRequest("hello there", max_tokens=5, stop=("\n",)), GenerateRequest("abc", n=2, seed=3)])
    assert [g.texts for g in out] == [("echo:hello there",), ("echo:abc", "echo:abc")]
    assert (b.usage.calls, b.usage.requests, b.usage.completion_tokens) == (1, 3, 6)
    assert b.usage.cost == 0.0  # a local model is not in litellm's cost map
    sent = sorted(fake.requests, key=lambda r: (r["prompt"], r["seed"]))
    assert [(r["prompt"], r["seed"]) for r in sent] == [("abc", 3_000_009), ("abc", 3_000_010), ("hello there", 0)]
    assert sent[2]["max_tokens"] == 5 and sent[2]["stop"] == ["\n"]


def test_transient_errors_are_retried_and_spend_budget(fake: FakeOpenAI) -> None:
    fake.fail_with = [500, 429, 503]
    b = backend(fake.api_base, max_retries=4)
    [out] = b.generate([GenerateRequest("hi")])
    assert out.texts == ("echo:hi",)
    assert len(fake.requests) == 4 and b.errors == 3


def test_a_bad_request_is_not_retried(fake: FakeOpenAI) -> None:
    fake.fail_with = [400]
    b = backend(fake.api_base, max_retries=4)
    with pytest.raises(RuntimeFailure, match="not retryable"):
        b.generate([GenerateRequest("hi")])
    assert len(fake.requests) == 1


def test_retries_run_out_with_a_clear_error(fake: FakeOpenAI) -> None:
    fake.always_fail = 503
    b = backend(fake.api_base, max_retries=2)
    with pytest.raises(RuntimeFailure, match="after 3 attempts") as err:
        b.generate([GenerateRequest("hi")])
    assert len(fake.requests) == 3
    assert fake.api_base in str(err.value)  # the hint names the server to check


def test_the_error_budget_stops_the_run(fake: FakeOpenAI) -> None:
    fake.always_fail = 500
    b = backend(fake.api_base, max_retries=50, max_errors=3, concurrency=1)
    with pytest.raises(RuntimeFailure, match="more than max_errors=3"):
        b.generate([GenerateRequest(f"q{i}") for i in range(5)])
    assert len(fake.requests) == 4  # the 4th failure spends the budget; nothing is sent after it


def test_concurrency_is_limited(fake: FakeOpenAI) -> None:
    fake.delay = 0.15
    b = backend(fake.api_base, concurrency=3)
    b.generate([GenerateRequest(f"q{i}") for i in range(9)])
    assert fake.max_in_flight == 3


# --------------------------------------------------------------------------- keys


def test_api_key_is_sent_but_never_stored(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from dlngraph.runtime.cache import Cache, CachedBackend

    monkeypatch.setenv("DLN_TEST_KEY", SECRET)
    fake.fail_with = [500]  # an error message gets logged too
    b = backend(fake.api_base, api_key_env="DLN_TEST_KEY")
    cache = Cache(tmp_path / "responses")
    with caplog.at_level(logging.DEBUG):
        CachedBackend(b, cache).generate([GenerateRequest("hi")])
    cache.close()
    sent = {name.lower(): value for name, value in fake.headers[-1].items()}  # HTTP header names have no case
    assert sent["authorization"] == f"Bearer {SECRET}"
    stored = [b.spec.model_dump_json(), b.identity, caplog.text, *(p.read_bytes().decode("latin-1") for p in (tmp_path / "responses").glob("*"))]
    assert not any(SECRET in text for text in stored)


def test_a_missing_key_variable_is_named(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLN_TEST_KEY", raising=False)
    b = backend(fake.api_base, api_key_env="DLN_TEST_KEY")
    with pytest.raises(RuntimeFailure, match="DLN_TEST_KEY"):
        b.generate([GenerateRequest("hi")])
    assert fake.requests == []


# --------------------------------------------------------------------------- scoring


def test_single_token_choices_come_from_one_top_k_request_per_prompt(fake: FakeOpenAI) -> None:
    b = backend(fake.api_base)
    requests = [ScoreRequest(p, c, prefix="Q: ") for p in ("one\nA:", "two\nA:") for c in (" yes", " no", " maybe")]
    scores = b.score(requests)
    assert len(fake.requests) == 2
    assert all(r["logprobs"] == 1000 and r["min_tokens"] == 1 for r in fake.requests)
    assert [s.total for s in scores[:2]] == [TOP[" yes"], TOP[" no"]]
    # An unlisted token is bounded by the unlisted mass and the least likely listed token.
    unlisted = math.log(1 - sum(math.exp(v) for v in TOP.values()))
    assert scores[2].total == pytest.approx(min(unlisted, min(TOP.values())))
    assert scores[3:] == scores[:3]


def test_no_logprobs_is_a_scored_outcome_not_a_crash(fake: FakeOpenAI) -> None:
    fake.no_logprobs = True
    scores = backend(fake.api_base).score([ScoreRequest("Q:", " yes"), ScoreRequest("Q:", " no")])
    assert scores[0].total == scores[1].total  # no information: the choices tie


def test_multi_token_choices_are_refused_without_score_capability(fake: FakeOpenAI, embedded_tokenizer: str) -> None:
    b = backend(fake.api_base, tokenizer=embedded_tokenizer)
    with pytest.raises(RuntimeFailure, match="not single tokens"):
        b.score([ScoreRequest("Q:", " yes"), ScoreRequest("Q:", " absolutely not")])
    assert fake.requests == []


def test_declared_score_capability_scores_by_echo(fake: FakeOpenAI) -> None:
    b = backend(fake.api_base, capabilities=["generate", "top_logprobs", "score"])
    [score] = b.score([ScoreRequest("Q: is it", " yes or no", prefix="x ")])
    assert score.token_logprobs == (TOP[" yes"], -1.0, TOP[" no"])
    assert fake.requests[0]["echo"] is True


# --------------------------------------------------------------------------- probing


def test_probe_accepts_correct_echo_and_caches_on_disk(fake: FakeOpenAI) -> None:
    spec = LiteLLMBackendSpec(model="openai/fake", api_base=fake.api_base)
    assert probe_backend(spec) == frozenset(Capability) - {Capability.KV_ACCESS}
    asked = len(fake.requests)
    assert probe_backend(spec) == frozenset(Capability) - {Capability.KV_ACCESS}
    assert len(fake.requests) == asked  # answered from disk
    assert LiteLLMBackend(spec).capabilities == probe_backend(spec)
    saved = json.loads(probe_path("openai/fake", fake.api_base).read_text())
    assert saved["capabilities"] == ["generate", "score", "top_logprobs"]


def test_probe_refuses_shifted_echo_logprobs(fake: FakeOpenAI) -> None:
    fake.shifted_echo = True
    spec = LiteLLMBackendSpec(model="openai/fake", api_base=fake.api_base)
    assert probe_backend(spec) == {Capability.GENERATE, Capability.TOP_LOGPROBS}
    notes = json.loads(probe_path("openai/fake", fake.api_base).read_text())["notes"]
    assert "known-answer check failed" in notes["score"]


def test_probe_without_logprobs_keeps_generation_only(fake: FakeOpenAI) -> None:
    fake.no_logprobs = True
    assert probe_backend(LiteLLMBackendSpec(model="openai/fake", api_base=fake.api_base)) == {Capability.GENERATE}


SPEC = """\
name: probed
backends:
  api: {{kind: litellm, model: openai/fake, api_base: "{api_base}"}}
inputs: [input]
nodes:
  reason:
    prompt: Think.
    template: "{{{{ input }}}} {{{{ prompt }}}}"
    output: {{type: text, max_tokens: 8}}
  answer:
    trainable: false
    template: "{{{{ reason }}}} Answer:"
    output: {{type: choice, choices: [" yes", " no"]}}
outputs: {{answer: target}}
"""


def test_compiler_uses_probed_capabilities(fake: FakeOpenAI, tmp_path: Path) -> None:
    from dlngraph.api import compile_spec

    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(api_base=fake.api_base))
    plan = compile_spec(path, probe_timeout=30)  # the trainable text layer needs `score`: the endpoint has it
    assert plan.nodes["reason"].backend == "api"

    fake.shifted_echo = True
    probe_path("openai/fake", fake.api_base).unlink()
    with pytest.raises(SpecError) as err:
        compile_spec(path, probe_timeout=30)
    [diagnostic] = err.value.diagnostics
    assert diagnostic.code == "E401" and diagnostic.node == "reason" and "cannot score" in diagnostic.message


def test_compiling_a_hosted_spec_neither_probes_nor_imports_litellm(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace('api_base: "{api_base}"', "capabilities: [generate, score]").format())
    code = (
        "import sys; from dlngraph.api import compile_spec; "
        f"compile_spec({str(path)!r}); print('litellm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- router


def test_router_spreads_calls_and_routes_around_a_failing_deployment() -> None:
    with FakeOpenAI() as one, FakeOpenAI() as two:
        spec = LiteLLMBackendSpec(
            model="openai/fake",
            deployments=[Deployment(api_base=one.api_base), Deployment(api_base=two.api_base)],
            backoff=0.01, capabilities=["generate"], concurrency=2,
        )  # fmt: skip
        b = LiteLLMBackend(spec)
        b.generate([GenerateRequest(f"q{i}") for i in range(16)])
        assert len(one.requests) >= 3 and len(two.requests) >= 3
        assert sum(b.routed.values()) == 16

        two.always_fail = 500
        before = len(one.requests)
        out = b.generate([GenerateRequest(f"r{i}") for i in range(16)])
        assert all(g.texts for g in out)
        assert len(one.requests) - before == 16  # every request ended up on the healthy server
        # Cooled down after its first failures (two may be in flight at once); without
        # cooldown about half of the 16 would fail first.
        assert b.errors <= 4


def test_probe_skips_an_unreachable_deployment_but_not_all(fake: FakeOpenAI) -> None:
    dead = "http://127.0.0.1:9/v1"  # discard port: connection refused
    spec = LiteLLMBackendSpec(model="openai/fake", deployments=[Deployment(api_base=fake.api_base), Deployment(api_base=dead)])
    assert probe_backend(spec) == frozenset(Capability) - {Capability.KV_ACCESS}
    with pytest.raises(RuntimeFailure, match="attempts"):
        probe_backend(LiteLLMBackendSpec(model="openai/fake", deployments=[Deployment(api_base=dead)]))
