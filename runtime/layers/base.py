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


Demo = tuple[tuple[str, str], ...]  # one demonstration: sorted (field, value) pairs, the target as "label"


@dataclass(frozen=True)
class Params:
    """A layer's learnable state, as one hashable value the trainer can compare,
    deduplicate and keep: the instruction, the demonstrations its template shows
    as `{{ demos }}`, and the fitted label prior of a calibrated choice node
    (None: estimate it where the node is scored; see runtime/calibration.py)."""

    prompt: str
    demos: tuple[Demo, ...] = ()
    bias: tuple[tuple[str, float], ...] | None = None

    def demo_dicts(self) -> list[dict[str, str]]:
        return [dict(d) for d in self.demos]

    def bias_dict(self) -> dict[str, float] | None:
        return None if self.bias is None else dict(self.bias)

    def uncalibrated(self) -> "Params":
        """The same prompt and demonstrations, with the prior to be estimated again."""
        return Params(self.prompt, self.demos, None)
