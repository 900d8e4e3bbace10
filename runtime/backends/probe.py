"""What an OpenAI-compatible endpoint really supports, found by asking it.

Three small requests per endpoint, on first use, remembered on disk under
`cache_root()/probes` for a day:

1. generation: a short completion comes back -> `generate`;
2. top-k: `logprobs=5` with `max_tokens=1` returns several next-token
   alternatives that form part of a distribution -> `top_logprobs`;
3. known answer: the prompt is echoed back followed by its own most likely next
   token t; the echoed log-prob of t must equal the log-prob the endpoint gave t
   as a next token in step 2. llama.cpp's server fails this (its echoed prompt
   log-probs are shifted by one position), vLLM passes -> `score`.

Nothing here sends a request on its own: the caller passes `connect`, which
builds a sender for one endpoint (the litellm backend's `prober`), and one
monotonic `deadline` that bounds every request of the probe together, however
many endpoints and retries there are. `dlngraph compile` probes only when
asked (`--probe`); declared `capabilities:` always win without a request, and
hosted providers keep the kind's declaration. This module does not import the
litellm backend, which imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlngraph.capabilities import DECLARED, Capability
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.replies import continuation_score, describe, top_alternatives
from dlngraph.runtime.files import write_atomic
from dlngraph.spec import LiteLLMBackendSpec

log = logging.getLogger(__name__)

# A prompt whose likely next token is one whole word (" Paris") on most tokenizers.
KNOWN_PROMPT = "The capital of France is"
# Echoed and next-token log-probs come from the same weights on the same server;
# batching noise on a GPU server is ~1e-3, a shifted position is off by nats.
TOLERANCE = 0.05
MAX_AGE = 24 * 3600.0

# (model, api_base, api_key_env, deadline) -> a sender with `run_batch(jobs)` for that endpoint.
Connect = Callable[[str, str, str | None, float], Any]


@dataclass(frozen=True)
class Probe:
    capabilities: frozenset[Capability]
    notes: dict[str, str] = field(default_factory=dict)  # capability -> why it is missing

    def to_json(self, model: str, api_base: str) -> str:
        payload = {
            "api_base": api_base,
            "capabilities": sorted(self.capabilities),
            "model": model,
            "notes": dict(sorted(self.notes.items())),
            "probed_at": time.time(),
        }
        return json.dumps(payload, indent=2, sort_keys=True)


def endpoints(spec: LiteLLMBackendSpec) -> list[tuple[str, str, str | None]]:
    """(model, api_base, api_key_env) of every server the spec points at."""
    if spec.deployments:
        return [(d.model or spec.model, d.api_base, d.api_key_env or spec.api_key_env) for d in spec.deployments]
    return [(spec.model, spec.api_base, spec.api_key_env)] if spec.api_base else []


def probe_path(model: str, api_base: str) -> Path:
    from dlngraph.runtime.models import cache_root

    digest = hashlib.sha256(f"{model}\n{api_base.rstrip('/')}".encode()).hexdigest()[:16]
    return cache_root() / "probes" / f"{digest}.json"


def read_probe(model: str, api_base: str) -> Probe | None:
    path = probe_path(model, api_base)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if time.time() - float(data.get("probed_at", 0)) > MAX_AGE:
        return None
    return Probe(frozenset(Capability(c) for c in data["capabilities"]), dict(data.get("notes", {})))


def write_probe(model: str, api_base: str, probe: Probe) -> None:
    """Atomic, so concurrent probes of one endpoint never leave half a file."""
    write_atomic(probe_path(model, api_base), probe.to_json(model, api_base))


def cached_capabilities(spec: LiteLLMBackendSpec) -> frozenset[Capability] | None:
    """Declared or already-probed capabilities, without any request; None if unknown."""
    if spec.capabilities is not None:
        return frozenset(Capability(c) for c in spec.capabilities)
    points = endpoints(spec)
    probes = [read_probe(model, base) for model, base, _ in points]
    if not points or any(p is None for p in probes):
        return None
    return frozenset.intersection(*(p.capabilities for p in probes if p is not None))


def probe_endpoints(spec: LiteLLMBackendSpec, connect: Connect, *, deadline: float) -> frozenset[Capability]:
    """Capabilities every reachable endpoint of `spec` has, probing those not on
    disk yet, all before `deadline` (`time.monotonic()`); raises only if none
    answers (the Router routes around a dead one). A backend without an endpoint
    of its own keeps the kind's declaration."""
    known = cached_capabilities(spec)
    if known is not None:
        return known
    points = endpoints(spec)
    if not points:
        return DECLARED["litellm"]
    found: list[Probe] = []
    failure: RuntimeFailure | None = None
    for model, base, key_env in points:
        try:
            found.append(check_endpoint(model, base, key_env, connect, deadline=deadline))
        except RuntimeFailure as exc:
            log.warning("could not probe %s: %s", base, str(exc).splitlines()[0])
            failure = exc
    if not found:
        assert failure is not None
        raise failure
    return frozenset.intersection(*(p.capabilities for p in found))


def check_endpoint(model: str, api_base: str, api_key_env: str | None, connect: Connect, *, deadline: float) -> Probe:
    """Probe one endpoint (or read it from disk); raises RuntimeFailure if unreachable."""
    cached = read_probe(model, api_base)
    if cached is not None:
        return cached
    probe = run_probe(connect(model, api_base, api_key_env, deadline))
    log.info("probed %s at %s: %s %s", model, api_base, sorted(probe.capabilities), probe.notes)
    write_probe(model, api_base, probe)
    return probe


def run_probe(backend: Any) -> Probe:
    """The three checks over `backend` (anything with `run_batch(jobs)`)."""
    have = {Capability.GENERATE}
    notes: dict[str, str] = {}
    backend.run_batch([{"prompt": KNOWN_PROMPT, "max_tokens": 2, "temperature": 0.0}])
    try:
        [reply] = backend.run_batch([{"prompt": KNOWN_PROMPT, "max_tokens": 1, "temperature": 0.0, "logprobs": 5}])
        alternatives = top_alternatives(reply)
    except RuntimeFailure as exc:
        alternatives, notes["top_logprobs"] = {}, f"logprobs request refused: {describe(exc)}"
    if len(alternatives) >= 2 and sum(math.exp(v) for v in alternatives.values()) <= 1.0 + 1e-3:
        have.add(Capability.TOP_LOGPROBS)
    else:
        notes.setdefault("top_logprobs", f"no top-k next-token log-probs returned ({len(alternatives)} alternatives)")
        notes["score"] = "not checked: needs top-k log-probs for the known-answer check"
        return Probe(frozenset(have), notes)
    token, expected = max(alternatives.items(), key=lambda kv: kv[1])
    reason = _echo_mismatch(backend, token, expected)
    if reason is None:
        have.add(Capability.SCORE)
    else:
        notes["score"] = reason
    return Probe(frozenset(have), notes)


def _echo_mismatch(backend: Any, token: str, expected: float) -> str | None:
    """None when the echoed log-prob of `token` after the known prompt is right, else why not."""
    start, end = len(KNOWN_PROMPT), len(KNOWN_PROMPT) + len(token)
    job = {"prompt": KNOWN_PROMPT + token, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
    try:
        [reply] = backend.run_batch([job])
        echoed = continuation_score(reply, start, end).token_logprobs
    except (RuntimeFailure, AttributeError, TypeError) as exc:
        return f"no echoed prompt log-probs: {describe(exc)}"
    if len(echoed) != 1 or abs(echoed[0] - expected) > TOLERANCE:
        return (
            f"known-answer check failed: the echoed log-prob(s) of {token!r} after {KNOWN_PROMPT!r} are "
            f"{[round(v, 3) for v in echoed]}, but as a next token it has {expected:.3f}; the endpoint's "
            "prompt log-probs are misaligned (llama.cpp's server shifts them by one position)"
        )
    return None
