"""The litellm backend on a real OpenAI-compatible server: llama.cpp's server
(llama-cpp-python[server]) serving the embedded SmolLM2 GGUF on 127.0.0.1.

Covered: the probe refusing the server's shifted echo log-probs (and the
compiler refusing a spec that needs them); a forward pass and an eval of a spec
through litellm; a short fit; single-token choice scoring agreeing with the
torch backend on the same GGUF; two servers behind one Router; a server killed
mid-run and restarted (retries finish the run with the same answers); a server
killed for good (clear error, usable checkpoint, nothing lost from the cache).
Every server is started and stopped here, bounded in time.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dlngraph.capabilities import Capability
from dlngraph.errors import RuntimeFailure, SpecError
from dlngraph.runtime.backends.base import GenerateRequest, ScoreRequest
from dlngraph.runtime.backends.litellm_backend import LiteLLMBackend, probe_endpoint
from dlngraph.runtime.cache import Cache, CachedBackend
from dlngraph.spec import Deployment, LiteLLMBackendSpec

from servers import LITELLM_MODEL, LlamaServer, needs_server

pytestmark = [pytest.mark.server, needs_server, pytest.mark.timeout(300)]

DATA = Path(__file__).resolve().parents[1] / "specs" / "data" / "mpqa"
TEMPLATE = "{{ prompt }}\n\n{{ input }}\nAnswer:"
PROMPT = "Read the following review, then choose whether it is negative or positive."
CHOICES = ["negative", "positive"]
# llama.cpp runs the Q4_1 weights (with 8-bit quantized activations in its dot
# products), torch their fp32 de-quantization. Measured on the first 24 MPQA dev
# prompts x 2 choices: max |log p| gap 0.71 nats, mean 0.25; max gap of the
# class-normalized log-probs 0.14; argmax agreement 24/24. Tolerances: ~1.4x that.
LOGPROB_TOLERANCE = 1.0
NORMALIZED_TOLERANCE = 0.2


@pytest.fixture(scope="module", autouse=True)
def private_cache(torch_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Probe results go to a directory of this module's own (after the torch
    fixture has loaded the embedded model from the user cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DLNGRAPH_CACHE_DIR", str(tmp_path_factory.mktemp("dlngraph-cache")))
        yield


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="module")
def server(logs: Path) -> Iterator[LlamaServer]:
    with LlamaServer(logs, threads=2) as running:
        yield running


def examples(split: str, count: int) -> list[dict[str, str]]:
    lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    return [json.loads(line) for line in lines]


def write_spec(directory: Path, backend: dict[str, Any], *, train: int = 8, dev: int = 6, **train_fields: Any) -> Path:
    """DLN-1 on a slice of MPQA, its one choice node on the given litellm backend."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("dev", dev)):
        rows = examples(split, count)
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = {
        "name": "litellm-mpqa",
        "backends": {"api": {"kind": "litellm", "model": LITELLM_MODEL, **backend}},
        "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "inputs": ["input"],
        "nodes": {"answer": {"prompt": PROMPT, "template": TEMPLATE, "output": {"type": "choice", "choices": CHOICES}}},
        "outputs": {"answer": "target"},
        "train": {"iterations": 1, "batch_size": 4, "prompt_proposals": 2, "posterior_samples": 1,
                  "proposal_max_tokens": 24, "dev_size": dev, **train_fields},
    }  # fmt: skip
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- probe


def test_probe_refuses_the_shifted_echo_logprobs(server: LlamaServer, tmp_path: Path) -> None:
    from dlngraph.api import compile_spec

    probe = probe_endpoint(LITELLM_MODEL, server.api_base, None)
    assert probe.capabilities == {Capability.GENERATE, Capability.TOP_LOGPROBS}
    assert "known-answer check failed" in probe.notes["score"]

    # A trainable text layer needs multi-token scoring: refused at compile time.
    path = write_spec(tmp_path, {"api_base": server.api_base})
    spec = yaml.safe_load(path.read_text())
    spec["nodes"] = {
        "reason": {"prompt": "Think.", "template": "{{ input }} {{ prompt }}", "output": {"type": "text", "max_tokens": 8}},
        "answer": {**spec["nodes"]["answer"], "template": "{{ reason }}\nAnswer:", "trainable": False},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as err:
        compile_spec(path)
    [diagnostic] = err.value.diagnostics
    assert diagnostic.code == "E401" and diagnostic.node == "reason"


# --------------------------------------------------------------------------- forward, eval, fit


def test_forward_and_eval_through_litellm(server: LlamaServer, tmp_path: Path) -> None:
    from dlngraph.api import evaluate, run

    path = write_spec(tmp_path / "spec", {"api_base": server.api_base})
    outputs = run(path, examples("dev", 2), cache_dir=tmp_path / "cache")
    assert all(o["answer"] in CHOICES for o in outputs)

    first = evaluate(path, "dev", cache_dir=tmp_path / "cache")
    assert first.total == 6 and first.model_calls >= 1
    usage = first.usage["api"]
    assert usage.prompt_tokens > 0 and usage.cache_hits == 4  # the 2 examples x 2 choices `run` scored
    again = evaluate(path, "dev", cache_dir=tmp_path / "cache")
    assert again.model_calls == 0 and again.predictions == first.predictions


def test_short_fit_through_litellm(server: LlamaServer, tmp_path: Path) -> None:
    from dlngraph.api import fit

    path = write_spec(tmp_path / "spec", {"api_base": server.api_base})
    result = fit(path, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert result.iterations == 1
    assert (tmp_path / "run" / "checkpoints" / "iter-0001.yaml").is_file()
    assert isinstance(result.best["prompts"]["answer"], str) and result.best["prompts"]["answer"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]


# --------------------------------------------------------------------------- agreement with torch


def test_choice_scoring_agrees_with_torch(server: LlamaServer, torch_backend: Any) -> None:
    from dlngraph.runtime.calibration import logsumexp
    from dlngraph.runtime.template import score_request

    rows = examples("dev", 24)
    # The whole prompt as one text: the torch backend tokenizes a shared prefix on
    # its own, which an API (tokenizing the full text) cannot reproduce.
    split = [score_request(TEMPLATE, PROMPT, row, choice) for row in rows for choice in CHOICES]
    requests = [ScoreRequest(r.prefix + r.prompt, r.continuation) for r in split]
    api = LiteLLMBackend(LiteLLMBackendSpec(model=LITELLM_MODEL, api_base=server.api_base, concurrency=2))
    remote = [s.total for s in api.score(requests)]
    # The API's next-token scores sum a label's spellings (leading space, capitalisation)
    # found among its top alternatives; torch scores one continuation, so it sums the same set.
    spellings = [[ScoreRequest(r.prompt, v) for v in _spellings(r.continuation)] for r in requests]
    flat = [s.total for s in torch_backend.score([v for group in spellings for v in group])]
    local, at = [], 0
    for group in spellings:
        local.append(logsumexp(flat[at : at + len(group)]))
        at += len(group)
    gaps = [abs(a - b) for a, b in zip(remote, local)]
    raw_gap = max(gaps)

    def normalized(totals: list[float]) -> list[float]:
        pairs = [totals[i : i + 2] for i in range(0, len(totals), 2)]
        return [t - logsumexp(pair) for pair in pairs for t in pair]

    norm_gap = max(abs(a - b) for a, b in zip(normalized(remote), normalized(local)))
    agree = sum((r[0] > r[1]) == (t[0] > t[1]) for r, t in zip(zip(remote[::2], remote[1::2]), zip(local[::2], local[1::2])))
    print(f"max |log p| gap {raw_gap:.3f} (mean {sum(gaps) / len(gaps):.3f}), max normalized gap "
          f"{norm_gap:.3f}, argmax agreement {agree}/{len(rows)}")
    assert raw_gap <= LOGPROB_TOLERANCE
    assert norm_gap <= NORMALIZED_TOLERANCE
    assert agree >= len(rows) - 2  # near-ties may flip between Q4_1 and its de-quantization


def _spellings(continuation: str) -> list[str]:
    word = continuation.strip()
    return sorted({f"{space}{form}" for space in ("", " ") for form in (word, word.lower(), word.capitalize())})


# --------------------------------------------------------------------------- scale-out and failures


def test_two_servers_behind_one_router_both_receive_requests(server: LlamaServer, logs: Path) -> None:
    with LlamaServer(logs) as second:
        spec = LiteLLMBackendSpec(
            model=LITELLM_MODEL,
            deployments=[Deployment(api_base=server.api_base), Deployment(api_base=second.api_base)],
            concurrency=2, capabilities=["generate"],
        )  # fmt: skip
        backend = LiteLLMBackend(spec)
        out = backend.generate([GenerateRequest(f"Item {i}:", max_tokens=2) for i in range(12)])
    assert len(out) == 12
    assert set(backend.routed) == {server.api_base, second.api_base}  # each got at least one


def test_server_killed_mid_run_and_restarted_finishes_by_retrying(server: LlamaServer, logs: Path, tmp_path: Path) -> None:
    from dlngraph.api import evaluate

    reference = evaluate(write_spec(tmp_path / "ref", {"api_base": server.api_base}, dev=8), "dev", no_cache=True)
    flaky = LlamaServer(logs).start()
    try:
        backend = {"api_base": flaky.api_base, "concurrency": 1, "max_retries": 8, "backoff": 0.3}
        path = write_spec(tmp_path / "spec", backend, dev=8)
        inner = LiteLLMBackend(LiteLLMBackendSpec(**yaml.safe_load(path.read_text())["backends"]["api"]))
        cache = Cache(tmp_path / "cache")
        done: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: done.update(result=evaluate(path, "dev", backends={"api": CachedBackend(inner, cache)}, batch_size=4))
        )
        worker.start()
        _wait_for(lambda: inner.usage.requests >= 3, "three answered requests")
        flaky.kill()
        time.sleep(0.5)
        flaky = LlamaServer(logs, port=flaky.port).start()
        worker.join(timeout=180)
    finally:
        flaky.stop()
    assert "result" in done, "the eval did not finish"
    assert inner.errors >= 1  # it did hit the dead server
    assert done["result"].predictions == reference.predictions


def test_server_killed_for_good_stops_with_checkpoint_and_full_cache(logs: Path, tmp_path: Path) -> None:
    from dlngraph.api import fit as fit_spec
    from dlngraph.runtime.checkpoint import load_learned

    doomed = LlamaServer(logs).start()
    backend = {"api_base": doomed.api_base, "max_retries": 2, "backoff": 0.1, "max_errors": 3, "capabilities": ["generate", "top_logprobs"]}
    path = write_spec(tmp_path / "spec", backend, iterations=3)
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    done: dict[str, Any] = {}

    def fit() -> None:
        try:
            done["result"] = fit_spec(path, out=run_dir, cache_dir=cache_dir)
        except RuntimeFailure as exc:
            done["error"] = exc

    worker = threading.Thread(target=fit)
    worker.start()
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "iter-0001.yaml").is_file(), "the first iteration's checkpoint")
        entries_at_kill = _entries(cache_dir)
    finally:
        doomed.kill()
    worker.join(timeout=120)
    assert "error" in done, f"the fit did not stop: {done}"
    message = str(done["error"])
    assert doomed.api_base in message and ("max_errors=3" in message or "attempts" in message)

    # A usable checkpoint: the last one loads, and its prompts are what a resume starts from.
    checkpoints = sorted((run_dir / "checkpoints").glob("iter-*.yaml"))
    assert checkpoints and load_learned(checkpoints[-1])["prompts"]["answer"]
    # Nothing lost: every answer cached before the kill is still there, in a sound database.
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert entries_at_kill <= _entries(cache_dir)


def test_every_answer_received_before_the_server_died_is_cached(logs: Path, tmp_path: Path) -> None:
    """The server dies in the middle of one batch: the answers that came back are all in
    the cache (not only those of batches that finished), so a re-run asks for the rest."""
    doomed = LlamaServer(logs).start()
    spec = LiteLLMBackendSpec(model=LITELLM_MODEL, api_base=doomed.api_base, concurrency=2, max_retries=0,
                              max_errors=1, capabilities=["generate", "top_logprobs"])  # fmt: skip
    inner = LiteLLMBackend(spec)
    requests = [GenerateRequest(f"Item {i}:", max_tokens=2) for i in range(400)]
    done: dict[str, Any] = {}

    def generate() -> None:
        try:
            CachedBackend(inner, Cache(tmp_path / "cache")).generate(requests)
        except RuntimeFailure as exc:
            done["error"] = exc

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        _wait_for(lambda: inner.usage.requests >= 10, "ten answers")
    finally:
        doomed.kill()
    worker.join(timeout=120)
    assert "error" in done, "the batch did not fail"
    assert 10 <= inner.usage.requests < len(requests)
    assert len(_entries(tmp_path / "cache")) == inner.usage.requests


def _entries(cache_dir: Path) -> set[str]:
    with sqlite3.connect(cache_dir / "cache.sqlite") as db:
        return {key for (key,) in db.execute("SELECT key FROM entries")}


def _wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
