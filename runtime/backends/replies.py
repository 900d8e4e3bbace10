"""Reading OpenAI-compatible completion replies: top-k next-token alternatives,
echoed prompt log-probs, and a one-line description of a failed call.

Shared by the litellm backend (scoring) and the endpoint probe (its checks),
so neither imports the other for them.
"""

from __future__ import annotations

import math
from typing import Any

from dlngraph.runtime.backends.base import Score
from dlngraph.runtime.calibration import logsumexp


def describe(exc: BaseException) -> str:
    """One line naming the error (litellm's messages run long)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def top_alternatives(response: Any) -> dict[str, float]:
    """token text -> log-prob of the first generated position's top-k; empty when
    the server returned none (e.g. it stopped at once), which is still an answer."""
    logprobs = getattr(response.choices[0], "logprobs", None)
    top = getattr(logprobs, "top_logprobs", None) if logprobs is not None else None
    if not top or not top[0]:
        return {}
    out: dict[str, float] = {}
    for token, value in dict(top[0]).items():
        out[token] = max(out.get(token, -math.inf), float(value))
    return out


def choice_logprob(alternatives: dict[str, float], choice: str) -> float:
    """log p(choice): the summed probability of its spellings among the alternatives
    (with or without a leading space, any capitalisation, as the DLN reference sums
    its verbalizers), else an upper bound on it: no more than the least likely
    listed token, nor than the unlisted mass."""
    key = choice.strip().lower()
    spellings = [v for token, v in alternatives.items() if token.strip() and token.strip().lower() == key]
    if spellings:
        return logsumexp(spellings)
    rest = 1.0 - sum(math.exp(v) for v in alternatives.values())
    bound = math.log(max(rest, 1e-12))
    return min([bound, *alternatives.values()])


def continuation_score(response: Any, start: int, end: int) -> Score:
    """Sum of the echoed log-probs of the tokens at character offsets [start, end)."""
    logprobs = response.choices[0].logprobs
    offsets = list(logprobs.text_offset)
    values = list(logprobs.token_logprobs)
    picked = tuple(float(v) for o, v in zip(offsets, values) if start <= o < end and v is not None)
    return Score(picked, prompt_tokens=sum(1 for o in offsets if o < start))
