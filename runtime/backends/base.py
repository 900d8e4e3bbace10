"""The backend protocol: batched by construction.

A backend turns lists of requests into lists of results, in order. It knows
nothing of templates or specs (DSPy's split: the layer renders, the backend
transports). Each backend declares its `capabilities`; the compiler's
capability pass reads them as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from dlngraph.capabilities import Capability
from dlngraph.errors import RuntimeFailure

if TYPE_CHECKING:
    import torch

    from dlngraph.runtime.kv_state import KVState


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    texts: tuple[str, ...]  # n samples
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ScoreRequest:
    """log p(continuation | prompt). `prefix` is the part of the prompt shared
    by many requests (a node's instruction); backends may reuse its KV cache.
    The full prompt is `prefix + prompt`. `state` is the content digest of a K/V
    state the backend holds (`KVPrefixScoring.hold`); the prompt is read after it,
    as plain text. A digest keeps requests hashable and cache keys exact."""

    prompt: str
    continuation: str
    prefix: str = ""
    state: str = ""


@dataclass(frozen=True)
class Score:
    token_logprobs: tuple[float, ...]
    prompt_tokens: int = 0

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean(self) -> float:
        # An empty continuation (e.g. end-of-text first) is a scored outcome, not a crash.
        return self.total / len(self.token_logprobs) if self.token_logprobs else 0.0


class PartialBatch(RuntimeFailure):
    """A batch that failed after some answers had arrived: `answers` maps the
    index of each answered request to its result, so that the response cache
    keeps every answer received (a re-run then asks only for the rest)."""

    def __init__(self, failure: RuntimeFailure, answers: dict[int, Any]) -> None:
        # The failure's own text and hint, as rendered to the user, unchanged.
        Exception.__init__(self, *failure.args)
        self.node, self.hint = failure.node, failure.hint
        self.answers = answers


@dataclass
class Usage:
    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0
    cache_hits: int = 0

    def add(self, other: "Usage") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def __sub__(self, other: "Usage") -> "Usage":
        """What was used since `other` (a copy taken earlier)."""
        return Usage(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})

    def copy(self) -> "Usage":
        return Usage(**self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in sorted(self.__dataclass_fields__)}


@runtime_checkable
class Backend(Protocol):
    """What every backend provides. `identity` names the model exactly (incl.
    a weight-file hash where there is one) and is part of every cache key."""

    kind: ClassVar[str]
    capabilities: frozenset[Capability]
    identity: str
    usage: Usage

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]: ...

    def score(self, requests: list[ScoreRequest]) -> list[Score]: ...

    def close(self) -> None: ...


@runtime_checkable
class KVPrefixScoring(Protocol):
    """What a Deep-Thinking layer needs of a `kv_access` backend (the torch one):
    passes that build a K/V state over token ids, and holding a state so that
    ordinary `score` requests can name it (`ScoreRequest.state`)."""

    identity: str

    def tokenizer_name(self) -> str: ...

    def token_ids(self, text: str) -> tuple[int, ...]: ...

    def check_context(self, length: int, what: str = ..., *, node: str | None = None, hint: str = ...) -> None: ...

    def kv_forward(self, ids: Sequence[int], past: KVState | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def hold(self, owner: str, state: KVState) -> str: ...


@dataclass
class BackendBase:
    """Shared bookkeeping for concrete backends."""

    usage: Usage = field(default_factory=Usage)

    def close(self) -> None:  # pragma: no cover - trivial
        pass
