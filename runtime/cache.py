"""A content-addressed response cache in SQLite, and the backend wrapper using it.

The key is the sha256 of canonical JSON of (backend kind, model identity, op,
the full request including every sampling parameter and seed), so a cached
answer is only ever reused for exactly the same question to exactly the same
model. The database is created on first use (never at import), runs in WAL
mode with a busy timeout, and each batch is written in one transaction, so two
processes can fill it at once without losing entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dlngraph.runtime.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    Score,
    ScoreRequest,
    Usage,
)
from dlngraph.runtime.models import cache_root

FILENAME = "cache.sqlite"

Req = TypeVar("Req", GenerateRequest, ScoreRequest)
Res = TypeVar("Res", Generation, Score)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    identity TEXT NOT NULL,
    op TEXT NOT NULL,
    value TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def request_key(kind: str, identity: str, op: str, request: Any) -> str:
    payload = {"kind": kind, "identity": identity, "op": op, "request": dataclasses.asdict(request)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Cache:
    """The SQLite store. `directory` defaults to the user cache directory."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self._directory = Path(directory) if directory is not None else None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return (self._directory or cache_root()) / FILENAME

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._lock:
            conn = self._connect()
            for start in range(0, len(keys), 500):
                part = list(keys[start : start + 500])
                marks = ",".join("?" * len(part))
                rows = conn.execute(f"SELECT key, value FROM entries WHERE key IN ({marks})", part)
                found.update(dict(rows.fetchall()))
        return found

    def put_many(self, kind: str, identity: str, op: str, items: dict[str, str]) -> None:
        now = time.time()
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                    [(k, kind, identity, op, v, now) for k, v in sorted(items.items())],
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def stats(self) -> dict[str, Any]:
        """Entry counts per (kind, identity, op) and the file size; no file is created."""
        if not self.path.is_file():
            return {"path": str(self.path), "entries": 0, "bytes": 0, "groups": []}
        with self._lock:
            rows = self._connect().execute(
                "SELECT kind, identity, op, COUNT(*) FROM entries GROUP BY kind, identity, op ORDER BY 1, 2, 3"
            ).fetchall()
        size = sum(p.stat().st_size for p in self.path.parent.glob(FILENAME + "*"))
        return {
            "path": str(self.path),
            "entries": sum(r[3] for r in rows),
            "bytes": size,
            "groups": [{"kind": k, "identity": i, "op": o, "entries": n} for k, i, o, n in rows],
        }

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        if not self.path.is_file():
            return 0
        with self._lock:
            conn = self._connect()
            removed = conn.execute("DELETE FROM entries").rowcount
            conn.execute("VACUUM")
        return removed

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class MemoryCache:
    """The store behind `--no-cache`: a dict that lives as long as the run.

    Nothing is read from or written to disk, so no answer outlives the process; an
    identical request within the run (a dev evaluation of unchanged prompts, the
    current prompt scored again as candidate 0) is answered once, as the DLN
    reference's in-run memo does. Same interface as `Cache` for `CachedBackend`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        with self._lock:
            return {k: self._entries[k] for k in keys if k in self._entries}

    def put_many(self, kind: str, identity: str, op: str, items: dict[str, str]) -> None:
        with self._lock:
            self._entries.update(items)


def _encode(result: Generation | Score) -> str:
    return json.dumps(dataclasses.asdict(result), sort_keys=True)


def _decode_generation(text: str) -> Generation:
    d = json.loads(text)
    return Generation(texts=tuple(d["texts"]), prompt_tokens=d["prompt_tokens"], completion_tokens=d["completion_tokens"])


def _decode_score(text: str) -> Score:
    d = json.loads(text)
    return Score(token_logprobs=tuple(d["token_logprobs"]), prompt_tokens=d["prompt_tokens"])


class CachedBackend:
    """Wraps a backend: dedupes a batch, answers hits from the cache and sends
    only the misses, in one batched call, to the inner backend.

    `usage.requests` counts requests asked, `usage.cache_hits` those answered
    without the model (cache or duplicate), `usage.calls` and the token counts
    the inner calls actually made.
    """

    def __init__(self, inner: Backend, cache: Cache | MemoryCache) -> None:
        self.inner = inner
        self.cache = cache
        self.kind = inner.kind
        self.capabilities = inner.capabilities
        self.identity = inner.identity
        self.usage = Usage()

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (model, tokenizer, ...) pass through.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        return self._through("generate", requests, self.inner.generate, _decode_generation)

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        return self._through("score", requests, self.inner.score, _decode_score)

    def _through(
        self,
        op: str,
        requests: list[Req],
        call: Callable[[list[Req]], list[Res]],
        decode: Callable[[str], Res],
    ) -> list[Res]:
        keys = [request_key(self.kind, self.identity, op, r) for r in requests]
        stored = self.cache.get_many(sorted(set(keys)))
        missing: dict[str, Req] = {}
        for key, request in zip(keys, requests):
            if key not in stored:
                missing.setdefault(key, request)
        answers = {k: decode(v) for k, v in stored.items()}
        self.usage.requests += len(requests)
        self.usage.cache_hits += len(requests) - len(missing)
        if missing:
            before = self.inner.usage.copy()
            fresh = call(list(missing.values()))
            answers.update(zip(missing, fresh))
            self.cache.put_many(self.kind, self.identity, op, {k: _encode(r) for k, r in zip(missing, fresh)})
            spent = self.inner.usage - before
            spent.requests = spent.cache_hits = 0  # counted above, from the caller's side
            self.usage.add(spent)
        return [answers[k] for k in keys]

    def close(self) -> None:
        self.inner.close()
