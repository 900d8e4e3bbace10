"""Capability names: what a backend declares and what a node needs.

Data, not code: the compiler compares sets of these strings; backends declare
them as a class attribute (or probe an endpoint) in the runtime.
"""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    GENERATE = "generate"
    SCORE = "score"  # log-prob of an arbitrary multi-token continuation
    TOP_LOGPROBS = "top_logprobs"  # top-k next-token log-probs (single-token choices)
    KV_ACCESS = "kv_access"  # key/value states of attention (Deep-Thinking)


# What each built-in backend kind declares before any probing. The litellm
# backend narrows or widens this by probing its endpoint (see runtime).
DECLARED: dict[str, frozenset[Capability]] = {
    "torch": frozenset(Capability),
    "litellm": frozenset({Capability.GENERATE, Capability.TOP_LOGPROBS}),
}
