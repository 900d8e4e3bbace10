"""A scripted backend for trainer tests: deterministic answers, no model.

`generate` and `score` answer from functions of the request (by default a
hash of it, so every distinct request gets its own stable answer) and log each
batched call, so tests can count calls per purpose and read what was asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from dlngraph.capabilities import Capability
from dlngraph.runtime.backends.base import GenerateRequest, Generation, Score, ScoreRequest, Usage


def _unit(*parts: object) -> float:
    """A stable number in [0, 1) from `parts`."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hashed_text(request: GenerateRequest) -> str:
    return f"text-{int(_unit(request.prompt, request.seed) * 1000)}"


def hashed_logprobs(request: ScoreRequest) -> list[float]:
    """One log-prob per word of the continuation, in [-3, -0.1)."""
    words = request.continuation.split() or [""]
    return [-0.1 - 2.9 * _unit(request.prefix + request.prompt, i, w) for i, w in enumerate(words)]


@dataclass
class ScriptedBackend:
    kind: ClassVar[str] = "scripted"
    capabilities: frozenset = frozenset(Capability)
    identity: str = "scripted"
    text: Callable[[GenerateRequest], str] = hashed_text
    logprobs: Callable[[ScoreRequest], list[float]] = hashed_logprobs
    usage: Usage = field(default_factory=Usage)
    log: list[tuple[str, list]] = field(default_factory=list)  # (op, requests) per batched call

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        self._count("generate", requests)
        out = [Generation((self.text(r),), len(r.prompt) // 4, 4) for r in requests]
        self.usage.completion_tokens += 4 * len(requests)
        return out

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        self._count("score", requests)
        return [Score(tuple(self.logprobs(r)), (len(r.prefix) + len(r.prompt)) // 4) for r in requests]

    def _count(self, op: str, requests: list) -> None:
        self.log.append((op, list(requests)))
        self.usage.calls += 1
        self.usage.requests += len(requests)
        self.usage.prompt_tokens += sum(len(getattr(r, "prefix", "") + r.prompt) // 4 for r in requests)

    def close(self) -> None:
        pass
