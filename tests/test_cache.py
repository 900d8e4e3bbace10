"""The SQLite response cache and the CachedBackend wrapper."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

from dlngraph.capabilities import Capability
from dlngraph.runtime.backends.base import BackendBase, GenerateRequest, Generation, Score, ScoreRequest
from dlngraph.runtime.cache import Cache, CachedBackend, MemoryCache, request_key


class EchoBackend(BackendBase):
    """Answers deterministically from the request and records every batch it gets."""

    kind: ClassVar[str] = "echo"
    capabilities = frozenset(Capability)
    identity = "echo@1"

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[object]] = []

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        self.batches.append(list(requests))
        self.usage.calls += 1
        return [Generation(texts=tuple(f"{r.prompt}#{r.seed}#{k}" for k in range(r.n)), completion_tokens=r.n) for r in requests]

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        self.batches.append(list(requests))
        self.usage.calls += 1
        return [Score(token_logprobs=(-float(len(r.prefix + r.prompt)), -0.5), prompt_tokens=3) for r in requests]


def test_cache_is_created_on_first_use_only(cache_dir: Path) -> None:
    cache = Cache(cache_dir)
    assert not cache_dir.exists()
    assert cache.stats()["entries"] == 0
    assert not cache_dir.exists()
    CachedBackend(EchoBackend(), cache).score([ScoreRequest("p", "c")])
    assert (cache_dir / "cache.sqlite").is_file()


def test_misses_go_in_one_deduplicated_batch_and_hits_skip_the_model(response_cache: Cache) -> None:
    inner = EchoBackend()
    backend = CachedBackend(inner, response_cache)
    a, b = ScoreRequest("x", " yes", "Q:"), ScoreRequest("y", " no", "Q:")
    first = backend.score([a, b, a])
    assert inner.batches == [[a, b]]
    assert first[0] == first[2] == inner.score([a])[0]
    inner.batches.clear()
    c = ScoreRequest("z", " yes", "Q:")
    second = backend.score([b, c, a])
    assert inner.batches == [[c]]
    assert second[0] == first[1] and second[2] == first[0]
    assert backend.usage.requests == 6 and backend.usage.cache_hits == 3 and backend.usage.calls == 2


def test_fully_cached_batch_makes_no_call_even_in_a_new_process_object(cache_dir: Path) -> None:
    requests = [GenerateRequest("hello", temperature=0.7, seed=s, n=2) for s in range(3)]
    expected = CachedBackend(EchoBackend(), Cache(cache_dir)).generate(requests)
    inner = EchoBackend()
    again = CachedBackend(inner, Cache(cache_dir)).generate(requests)
    assert again == expected and inner.usage.calls == 0 and inner.batches == []


@pytest.mark.parametrize(
    "change",
    [{"temperature": 0.5}, {"top_p": 0.9}, {"seed": 1}, {"n": 2}, {"max_tokens": 5}, {"stop": ("\n",)}],
)
def test_every_sampling_parameter_is_part_of_the_key(change: dict) -> None:
    base = GenerateRequest("same prompt")
    assert request_key("torch", "m", "generate", base) != request_key(
        "torch", "m", "generate", dataclasses.replace(base, **change)
    )
    assert request_key("torch", "m", "generate", base) != request_key("torch", "m2", "generate", base)


def test_a_score_request_keys_as_before_unless_it_names_a_kv_state() -> None:
    import hashlib
    import json

    request = ScoreRequest("p", " c", prefix="Q:")
    # The payload of the key before ScoreRequest had a `state` field: stored answers stay valid.
    before = {"kind": "torch", "identity": "m", "op": "score",
              "request": {"prompt": "p", "continuation": " c", "prefix": "Q:"}}
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert request_key("torch", "m", "score", request) == hashlib.sha256(canonical.encode()).hexdigest()
    one, other = (dataclasses.replace(request, state=d) for d in ("a" * 64, "b" * 64))
    keys = {request_key("torch", "m", "score", r) for r in (request, one, other)}
    assert len(keys) == 3  # a state's digest is part of the key


def test_the_wrapper_reaches_the_inner_backend_only_through_named_methods() -> None:
    backend = CachedBackend(EchoBackend(), MemoryCache())
    assert backend.kv_engine() is None  # the echo backend has no K/V-prefix engine
    with pytest.raises(AttributeError):
        backend.batches  # noqa: B018 - no attribute reach-through to the inner backend


def test_failed_inner_call_stores_nothing(response_cache: Cache) -> None:
    class Failing(EchoBackend):
        def score(self, requests: list[ScoreRequest]) -> list[Score]:
            raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        CachedBackend(Failing(), response_cache).score([ScoreRequest("p", "c")])
    assert response_cache.stats()["entries"] == 0
    assert CachedBackend(EchoBackend(), response_cache).score([ScoreRequest("p", "c")])[0].token_logprobs == (-1.0, -0.5)


def test_stats_and_clear(response_cache: Cache) -> None:
    backend = CachedBackend(EchoBackend(), response_cache)
    backend.score([ScoreRequest(str(i), "c") for i in range(4)])
    backend.generate([GenerateRequest("g")])
    stats = response_cache.stats()
    assert stats["entries"] == 5
    assert [(g["op"], g["entries"]) for g in stats["groups"]] == [("generate", 1), ("score", 4)]
    assert response_cache.clear() == 5
    assert response_cache.stats()["entries"] == 0


def test_no_cache_memo_dedupes_within_a_run_and_touches_no_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLNGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    inner = EchoBackend()
    backend = CachedBackend(inner, MemoryCache())
    first = backend.score([ScoreRequest("a", "c"), ScoreRequest("b", "c")])
    again = backend.score([ScoreRequest("b", "c"), ScoreRequest("a", "c"), ScoreRequest("z", "c")])
    assert again[:2] == first[::-1]
    assert [[r.prompt for r in batch] for batch in inner.batches] == [["a", "b"], ["z"]]
    assert backend.usage.requests == 5 and backend.usage.cache_hits == 2 and backend.usage.calls == 2
    # a new run starts empty: nothing outlived the first
    fresh = EchoBackend()
    CachedBackend(fresh, MemoryCache()).score([ScoreRequest("a", "c")])
    assert len(fresh.batches) == 1
    assert not any(tmp_path.rglob("*.sqlite"))


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dlngraph.runtime.cache import Cache
    cache, tag, ready = Cache(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    (ready / tag).touch()
    while len(list(ready.iterdir())) < 2:  # start writing together
        time.sleep(0.01)
    for batch in range(200):
        items = {f"{tag}-{batch}-{i}": f"{tag}{batch}{i}" for i in range(25)}
        cache.put_many("k", "m", "score", items)
        assert len(cache.get_many(sorted(items))) == 25
    """
)


def test_two_processes_writing_at_once_lose_nothing(cache_dir: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(cache_dir), tag, str(ready)], stderr=subprocess.PIPE, text=True
        )
        for tag in ("a", "b")
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    cache = Cache(cache_dir)
    assert cache.stats()["entries"] == 2 * 200 * 25
    keys = [f"{t}-{b}-{i}" for t in "ab" for b in range(200) for i in range(25)]
    assert cache.get_many(keys) == {k: k.replace("-", "") for k in keys}


# --------------------------------------------------------------------------- answers kept, damage repaired


def test_answers_of_a_batch_that_failed_part_way_are_kept(response_cache: Cache) -> None:
    from dlngraph.errors import RuntimeFailure
    from dlngraph.runtime.backends.base import PartialBatch

    class DiesAfterTwo(EchoBackend):
        def score(self, requests: list[ScoreRequest]) -> list[Score]:
            answered = super().score(requests[:2])
            raise PartialBatch(RuntimeFailure("server went away", hint="restart it"), dict(enumerate(answered)))

    requests = [ScoreRequest(str(i), "c") for i in range(5)]
    with pytest.raises(RuntimeFailure, match="server went away") as err:
        CachedBackend(DiesAfterTwo(), response_cache).score(requests)
    assert err.value.hint == "restart it"
    assert response_cache.stats()["entries"] == 2
    inner = EchoBackend()
    CachedBackend(inner, response_cache).score(requests)
    assert inner.batches == [requests[2:]]  # the two answers that arrived are not asked again


def damage(path: Path) -> None:
    """Overwrite every page after the first with junk: SQLite then reports the file malformed."""
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * (path.stat().st_size - 4096))


@pytest.mark.parametrize("how", ["overwritten", "pages"])
def test_a_damaged_cache_is_set_aside_with_a_warning_and_rebuilt(
    how: str, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Cache(cache_dir)
    CachedBackend(EchoBackend(), first).score([ScoreRequest(f"prompt {i}" * 40, "c") for i in range(200)])
    first.close()
    path = cache_dir / "cache.sqlite"
    if how == "overwritten":
        path.write_bytes(b"this is no database\n" * 100)
    else:
        damage(path)
    inner = EchoBackend()
    with caplog.at_level("WARNING", logger="dlngraph.runtime.cache"):
        answers = CachedBackend(inner, Cache(cache_dir)).score([ScoreRequest("p", "c")])
    assert answers[0].token_logprobs == (-1.0, -0.5) and len(inner.batches) == 1
    [aside] = sorted(cache_dir.glob("cache.sqlite.corrupt-*"))
    assert str(path) in caplog.text and str(aside) in caplog.text
    assert Cache(cache_dir).stats()["entries"] == 1  # the new cache works


def test_stats_names_a_damaged_file_and_clear_removes_it(cache_dir: Path) -> None:
    from dlngraph.errors import RuntimeFailure

    cache_dir.mkdir()
    path = cache_dir / "cache.sqlite"
    path.write_bytes(b"\0junk" * 1000)
    cache = Cache(cache_dir)
    assert cache.damage() is not None
    with pytest.raises(RuntimeFailure, match=f"the response cache {path} is damaged") as err:
        cache.stats()
    assert "dlngraph cache clear" in str(err.value)
    assert cache.clear() == 0 and not path.exists()
    assert cache.stats()["entries"] == 0


def test_cache_commands_on_a_damaged_file(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli_runner import invoke

    cache_dir.mkdir()
    path = cache_dir / "cache.sqlite"
    path.write_bytes(b"\0junk" * 1000)
    code, out, err = invoke(capsys, "cache", "stats", "--cache", str(cache_dir))
    assert code == 1 and str(path) in err and "dlngraph cache clear" in err and "Traceback" not in err
    code, out, err = invoke(capsys, "cache", "clear", "--cache", str(cache_dir))
    assert code == 0 and out.startswith(f"removed damaged cache file {path}") and err == ""
    assert invoke(capsys, "cache", "stats", "--cache", str(cache_dir))[:2] == (0, f"{path}: 0 entries, 0.0 MB\n")
