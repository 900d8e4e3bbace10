"""Network use is asked for and bounded: `dlngraph compile` is offline unless
`--probe` (and then one deadline bounds every probe request), a spec compiles
the same with or without its API key, a server that accepts and never answers
ends a run within the backend's `timeout` (retries included), and the answers
of a batch that fails part way are cached. Servers run on 127.0.0.1: a silent
socket (accepts, never answers) and the scripted one in fake_openai.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import GenerateRequest, PartialBatch, ScoreRequest
from dlngraph.runtime.backends.litellm_backend import LiteLLMBackend, import_litellm
from dlngraph.runtime.cache import Cache, CachedBackend
from dlngraph.spec import LiteLLMBackendSpec

from cli_runner import invoke
from fake_openai import FakeOpenAI
from servers import SilentServer

KEY_ENV = "DLNGRAPH_TEST_DEADLINE_KEY"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe results and responses go to the test's own directory."""
    monkeypatch.setenv("DLNGRAPH_CACHE_DIR", str(tmp_path / "user-cache"))


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def write_spec(directory: Path, api_base: str, *, text_layer: bool = False, timeout: float = 60.0) -> Path:
    backend = {"kind": "litellm", "model": "openai/slow", "api_base": api_base, "api_key_env": KEY_ENV,
               "timeout": timeout, "max_retries": 3, "backoff": 0.01}  # fmt: skip
    answer = {"prompt": "Yes or no?", "template": "{{ input }} {{ prompt }}", "output": {"type": "choice", "choices": [" yes", " no"]}}
    nodes = {"answer": answer}
    if text_layer:  # a trainable text layer needs `score`, which a litellm backend does not declare
        nodes = {
            "reason": {"prompt": "Think.", "template": "{{ input }} {{ prompt }}", "output": {"type": "text", "max_tokens": 8}},
            "answer": {**answer, "template": "{{ reason }} Answer:", "trainable": False},
        }
    spec = {"name": "deadlines", "backends": {"api": backend}, "inputs": ["input"], "nodes": nodes,
            "outputs": {"answer": "target"}}  # fmt: skip
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str, float]:
    """`invoke`, and the seconds it took."""
    started = time.monotonic()
    code, out, err = invoke(capsys, *args)
    return code, out, err, time.monotonic() - started


# --------------------------------------------------------------------------- compile


@pytest.mark.parametrize("text_layer", [False, True], ids=["compiles", "E401"])
def test_compile_is_offline_and_the_same_with_or_without_the_key(
    text_layer: bool, silent: SilentServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path, silent.api_base, text_layer=text_layer)
    monkeypatch.delenv(KEY_ENV, raising=False)
    without = cli(capsys, "compile", str(spec), "-f", "json")
    monkeypatch.setenv(KEY_ENV, "sk-present")
    with_key = cli(capsys, "compile", str(spec), "-f", "json")
    assert without[:3] == with_key[:3]
    assert without[0] == (2 if text_layer else 0)
    if text_layer:
        assert "E401" in without[2] and "dlngraph compile --probe" in without[2]
    time.sleep(0.2)
    assert silent.connections == []  # not one connection: compile sent nothing


def test_probe_ends_within_its_one_deadline(
    silent: SilentServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_litellm()  # its import time is not the probe's
    monkeypatch.setenv(KEY_ENV, "sk-present")
    spec = write_spec(tmp_path, silent.api_base)
    code, out, err, seconds = cli(capsys, "compile", str(spec), "--probe", "--probe-timeout", "4")
    assert code == 0 and out.startswith("plan ") and "Traceback" not in err
    assert "backend api: could not probe its endpoint" in err and "deadline" in err
    assert len(silent.connections) >= 1  # it did ask
    assert seconds < 4 + 4, f"probing took {seconds:.1f} s for a 4 s deadline"  # slack: a loaded machine


# --------------------------------------------------------------------------- run time


def test_a_hung_server_ends_a_batch_within_the_timeout_not_per_retry(silent: SilentServer) -> None:
    import_litellm()
    spec = LiteLLMBackendSpec(model="openai/slow", api_base=silent.api_base, timeout=1.0, max_retries=3,
                              backoff=0.01, concurrency=4, capabilities=["generate"])  # fmt: skip
    started = time.monotonic()
    with pytest.raises(RuntimeFailure, match=r"no answer within 1 s") as err:
        LiteLLMBackend(spec).generate([GenerateRequest(f"q{i}", max_tokens=2) for i in range(8)])
    seconds = time.monotonic() - started
    assert seconds < 1.0 + 1.0, f"a 1 s timeout with 3 retries took {seconds:.1f} s"
    assert silent.api_base in str(err.value)


def test_dlngraph_run_against_a_hung_server_stops_within_the_timeout(
    silent: SilentServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_litellm()
    monkeypatch.setenv(KEY_ENV, "sk-present")
    spec = write_spec(tmp_path, silent.api_base, timeout=1.0)
    code, out, err, seconds = cli(capsys, "run", str(spec), "--input", '{"input": "x"}', "--no-cache")
    assert code == 1 and out == "" and "Traceback" not in err
    assert "error:" in err and silent.api_base in err
    # One timeout for the scoring probe the first call makes and one for the call itself, at most.
    assert seconds < 2 * 1.0 + 1.5, f"run took {seconds:.1f} s with a 1 s timeout"


# --------------------------------------------------------------------------- answers kept


def fake_backend(fake: FakeOpenAI, **fields: object) -> LiteLLMBackend:
    fields = {"concurrency": 1, "max_retries": 0, "backoff": 0.01, "capabilities": ["generate", "top_logprobs"], **fields}
    return LiteLLMBackend(LiteLLMBackendSpec(model="openai/fake", api_base=fake.api_base, **fields))


def test_answers_received_before_a_failure_are_cached(fake: FakeOpenAI, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    requests = [GenerateRequest(f"question {i}", max_tokens=2) for i in range(10)]
    fake.fail_with = [0] * 6 + [400]  # six answers, then a request that is not retried
    with pytest.raises(PartialBatch) as err:
        CachedBackend(fake_backend(fake), cache).generate(requests)
    assert len(fake.requests) == 7 and sorted(err.value.answers) == list(range(6))
    assert cache.stats()["entries"] == 6

    fake.requests.clear()
    answers = CachedBackend(fake_backend(fake), cache).generate(requests)
    assert [r["prompt"] for r in fake.requests] == [f"question {i}" for i in range(6, 10)]  # only the missing ones
    assert [a.texts for a in answers] == [(f"echo:{r.prompt[-12:]}",) for r in requests]


def test_a_request_is_cached_only_when_all_its_samples_arrived(fake: FakeOpenAI, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    requests = [GenerateRequest(f"q{i}", max_tokens=2, temperature=0.7, n=2) for i in range(3)]
    fake.fail_with = [0, 0, 0, 400]  # q0's two samples, one of q1's
    with pytest.raises(PartialBatch):
        CachedBackend(fake_backend(fake), cache).generate(requests)
    assert cache.stats()["entries"] == 1


def test_scores_received_before_a_failure_are_cached(fake: FakeOpenAI, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    requests = [ScoreRequest(f"prompt {i}", c) for i in range(4) for c in (" yes", " no")]
    fake.fail_with = [0, 0, 400]  # two of the four distinct prompts answered
    with pytest.raises(PartialBatch):
        CachedBackend(fake_backend(fake), cache).score(requests)
    assert cache.stats()["entries"] == 4  # both choices of each answered prompt
