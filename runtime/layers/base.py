"""What every layer kind returns from `forward` and what `backward` receives.

A layer module (text, choice, deep_thinking) owns both halves side by side:
`forward(backend, prompt, rows)` renders and runs the node over a batch and
returns a `ForwardRecord` holding what the backward half needs; the backward
half (in the same module) reads that record plus the node's targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Row = dict[str, str]  # template variables of one example: inputs + parent outputs


@dataclass
class ForwardRecord:
    node: str
    prompt: str  # the learnable prompt used
    rendered: list[str]  # full rendered text sent to the model, per example
    outputs: list[str]  # per example: generated text, or the chosen label
    # per example, for choice nodes: class-normalized log-prob of every choice
    choice_logprobs: list[dict[str, float]] | None = None
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
