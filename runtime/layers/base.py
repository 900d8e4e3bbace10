"""The one layer protocol: what every node kind implements, and what it returns.

A layer (text, choice, deep_thinking) is bound to one plan node and its
backend and owns its parameters (`params`: the spec's, before any fit) and
both halves side by side, as micrograd's ops do: `forward`
renders and runs the node over a batch in ONE backend call and returns a
`ForwardRecord` holding what the backward half needs; `target_scores` is the
backward's request list (a `Deferred`, so the trainer merges every node of a
backward call into one backend call): how likely given targets are under given
parameters. Hidden layers also answer `posterior_samples`. A layer's learnable
state is `Params` (instruction, demonstrations, fitted label prior).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dlngraph.compiler.plan import PlanNode
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backward import Deferred, TargetScore
from dlngraph.spec import TrainSpec

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


def check_targets(targets: Iterable[str], choices: Sequence[str], node: str) -> None:
    """A choice node can only score targets that are among its choices."""
    unknown = sorted(set(targets) - set(choices))
    if unknown:
        raise RuntimeFailure(
            f"target(s) {', '.join(map(repr, unknown))} are not among the choices {list(choices)}",
            node=node,
            hint="the dataset's labels must be spelled exactly like the node's choices",
        )


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


class Layer(Protocol):
    """One node kind, bound to its plan node (see the module docstring)."""

    node: PlanNode

    def params(self, seed: int) -> Params:
        """The node's parameters before any fit (the spec's; `seed` draws demonstrations)."""
        ...

    def forward(self, rows: list[Row], params: Params, *, seed: int = 0) -> ForwardRecord: ...

    def target_scores(self, items: Sequence[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]: ...


@dataclass(frozen=True)
class Posterior:
    """What a hidden layer's posterior sampling reads for one batch."""

    params: Params
    rows: Sequence[Row]
    outputs: Sequence[str]  # the forward's, per example
    child_targets: Sequence[Sequence[tuple[str, str]]]  # per example, (child, target) pairs
    train: TrainSpec
    seed: int


@runtime_checkable
class HiddenLayer(Layer, Protocol):
    """A layer whose targets can come from a posterior (the plan's `needs_posterior`):
    per example its candidates, the current output first."""

    def posterior_samples(self, asked: Posterior) -> Deferred[list[list[str]]]: ...
