"""A content-addressed response cache in SQLite, and the backend wrapper using it.

The key is the sha256 of canonical JSON of (backend kind, model identity, op,
the full request including every sampling parameter and seed), so a cached
answer is only ever reused for exactly the same question to exactly the same
model. The database is created on first use (never at import), runs in WAL
mode with a busy timeout, and each batch is written in one transaction, so two
processes can fill it at once without losing entries. Answers are stored as
soon as a batch returns, and when a batch fails part way (`PartialBatch`) the
answers that did arrive are stored before the failure goes on.

A damaged file (overwritten, truncated: SQLite says "file is not a database"
or "malformed") is moved aside as `cache.sqlite.corrupt-<time>` with a warning
naming both paths, and an empty cache takes its place: a cache only saves
work, so losing one never stops a run. `stats` names a damaged file and says
how to fix it; `clear` removes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import (
    Backend,
    GenerateRequest,
    Generation,
    KVPrefixScoring,
    PartialBatch,
    Score,
    ScoreRequest,
    Usage,
)
from dlngraph.runtime.models import cache_root

log = logging.getLogger(__name__)

FILENAME = "cache.sqlite"
# SQLite's primary result codes for a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB.
DAMAGED = frozenset({11, 26})

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
    fields = dataclasses.asdict(request)
    # A score request without a K/V state keys as before the field existed, so stored answers stay valid.
    if fields.get("state") == "":
        del fields["state"]
    payload = {"kind": kind, "identity": identity, "op": op, "request": fields}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite reports a damaged file (not a busy lock or a missing directory)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in DAMAGED


class Cache:
    """The SQLite store. `directory` defaults to the user cache directory."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self._directory = Path(directory) if directory is not None else None
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None  # of the file opened, to move aside only that one
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return (self._directory or cache_root()) / FILENAME

    def _files(self) -> list[Path]:
        """The database and its WAL and shared-memory files."""
        return [self.path.with_name(self.path.name + suffix) for suffix in ("", "-wal", "-shm")]

    def _failure(self, exc: sqlite3.Error) -> RuntimeFailure:
        return RuntimeFailure(
            f"response cache {self.path}: {exc}",
            hint="pass --cache DIR for another location, or --no-cache; `dlngraph cache clear` removes a damaged file",
        )

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._inode = self.path.stat().st_ino if self.path.exists() else None
            conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise RuntimeFailure(
                f"cannot open the response cache {self.path}: {exc}", hint="pass --cache DIR for another location, or --no-cache"
            ) from None
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_aside(self, exc: sqlite3.Error) -> None:
        """Move a damaged database (and its WAL files) aside, unless another process already did."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            current = self.path.stat().st_ino
        except FileNotFoundError:
            current = None
        if current is not None and current == self._inode:
            for part in self._files():
                if part.exists():
                    os.replace(part, part.with_name(part.name.replace(self.path.name, aside.name, 1)))
            log.warning(
                "the response cache %s is damaged (%s); moved it to %s and started an empty cache", self.path, exc, aside
            )

    def _with_connection(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `work` on the connection; a damaged file is set aside once and `work` runs on a new one."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = self._open()
                    return work(self._conn)
                except sqlite3.Error as exc:
                    if attempt == 2 or not is_damage(exc):
                        raise self._failure(exc) from None
                    self._set_aside(exc)

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            for start in range(0, len(keys), 500):
                part = list(keys[start : start + 500])
                marks = ",".join("?" * len(part))
                rows = conn.execute(f"SELECT key, value FROM entries WHERE key IN ({marks})", part)
                found.update(dict(rows.fetchall()))
            return found

        return self._with_connection(read)

    def put_many(self, kind: str, identity: str, op: str, items: dict[str, str]) -> None:
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
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

        self._with_connection(write)

    def _query_as_is(self, sql: str) -> list[tuple[Any, ...]]:
        """Run `sql` on the file as it is: no schema is created and nothing is moved aside.
        A file without the table (empty, say) has no rows."""
        conn = sqlite3.connect(self.path, timeout=60.0)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def damage(self) -> str | None:
        """Why the cache file is damaged, or None when it is sound (or absent)."""
        if not self.path.is_file():
            return None
        try:
            self._query_as_is("SELECT COUNT(*) FROM entries")
        except sqlite3.Error as exc:
            if is_damage(exc):
                return str(exc)
            raise self._failure(exc) from None
        return None

    def stats(self) -> dict[str, Any]:
        """Entry counts per (kind, identity, op) and the file size; no file is created or changed."""
        if not self.path.is_file():
            return {"path": str(self.path), "entries": 0, "bytes": 0, "groups": []}
        damage = self.damage()
        if damage is not None:
            raise RuntimeFailure(
                f"the response cache {self.path} is damaged ({damage})",
                hint="run `dlngraph cache clear` to remove it; the next run starts an empty cache",
            )
        try:
            rows = self._query_as_is(
                "SELECT kind, identity, op, COUNT(*) FROM entries GROUP BY kind, identity, op ORDER BY 1, 2, 3"
            )
        except sqlite3.Error as exc:
            raise self._failure(exc) from None
        size = sum(p.stat().st_size for p in self._files() if p.is_file())
        return {
            "path": str(self.path),
            "entries": sum(r[3] for r in rows),
            "bytes": size,
            "groups": [{"kind": k, "identity": i, "op": o, "entries": n} for k, i, o, n in rows],
        }

    def clear(self) -> int:
        """Delete every entry; returns how many there were. A damaged file is removed (0)."""
        if not self.path.is_file():
            return 0
        if self.damage() is not None:
            self.close()
            for part in self._files():
                part.unlink(missing_ok=True)
            return 0

        def empty(conn: sqlite3.Connection) -> int:
            removed = conn.execute("DELETE FROM entries").rowcount
            conn.execute("VACUUM")
            return removed

        return self._with_connection(empty)

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

    def close(self) -> None:
        """Nothing to release; the memo goes with the run."""


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

    def kv_engine(self) -> KVPrefixScoring | None:
        """The inner backend's K/V-prefix engine (None without one). States are
        held there; score requests naming them still come through this cache."""
        return self.inner if isinstance(self.inner, KVPrefixScoring) else None

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
            try:
                fresh = call(list(missing.values()))
            except PartialBatch as failure:
                asked = list(missing)
                received = {asked[i]: _encode(r) for i, r in sorted(failure.answers.items())}
                if received:  # kept, so a re-run asks only for the answers that never came
                    self.cache.put_many(self.kind, self.identity, op, received)
                raise
            answers.update(zip(missing, fresh))
            self.cache.put_many(self.kind, self.identity, op, {k: _encode(r) for k, r in zip(missing, fresh)})
            spent = self.inner.usage - before
            spent.requests = spent.cache_hits = 0  # counted above, from the caller's side
            self.usage.add(spent)
        return [answers[k] for k in keys]

    def close(self) -> None:
        # The store may be shared by several backends: Cache reconnects on its next use.
        self.inner.close()
        self.cache.close()
