"""The ExecutionPlan: what the runtime executes and what `compile` prints.

Forward stages are topological generations (every node of a stage is one
batched call over all examples; the calls listed in a forward stage are sized
for one training batch of `train.batch_size` examples, those in `evaluation`
for one dev evaluation, those in `calibration` for one estimate of the label
priors of the trainable calibrated choice layers). The backward schedule walks
the generations in reverse; each step lists its batched calls grouped by
backend. Estimates of calls and tokens are part of the plan so `fit` can show
the cost up front.
Everything here is immutable and serializes to stable, sorted JSON.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dlngraph.errors import Span
from dlngraph.spec import DeepThinkingNode, LayerNode, Spec


class NodeKind(StrEnum):
    """The closed set of node kinds; the IR and the plan share it (plan.py is the leaf module)."""

    LAYER = "layer"
    DEEP_THINKING = "deep_thinking"


@dataclass(frozen=True)
class PlanNode:
    """The one node model, from the resolve pass on (the graph's nodes carry it, the plan
    holds it): the validated node spec, typed per kind, and what the compiler derived.
    Passes fill in what they learn with `dataclasses.replace` (the schedule: children,
    `needs_posterior`, proposer)."""

    name: str
    kind: NodeKind
    backend: str
    backend_kind: str
    output_type: str  # "text" | "choice"
    choices: tuple[str, ...]
    parents: tuple[str, ...]  # upstream nodes named by the template
    inputs: tuple[str, ...]  # dataset fields named by the template
    children: tuple[str, ...]
    trainable: bool
    target: str | None  # dataset field when the node is an output
    spec: LayerNode | DeepThinkingNode  # the validated node, typed per kind: what its layer reads
    span: Span = field(default_factory=Span, compare=False)
    demos: int = 0  # demonstrations the template shows as `{{ demos }}` (learned with the prompt)
    calibration: str = "none"  # label-prior removal of a choice layer: none | contextual | batch
    proposer: str = ""  # backend writing the node's proposals and posterior samples (trained or hidden layers)
    # A hidden layer whose targets a trainable node (itself or upstream) needs: its
    # backward samples candidates and scores them under itself and its children.
    needs_posterior: bool = False

    @classmethod
    def of(
        cls,
        name: str,
        spec: LayerNode | DeepThinkingNode,
        backend: tuple[str, str],
        reads: tuple[tuple[str, ...], tuple[str, ...]],
        target: str | None,
        span: Span,
    ) -> "PlanNode":
        """A node as the resolve pass finds it: `backend` is (name, kind), `reads` (parents, inputs)."""
        layer = spec if isinstance(spec, LayerNode) else None
        return cls(
            name=name,
            kind=NodeKind(spec.kind),
            backend=backend[0],
            backend_kind=backend[1],
            output_type=spec.output.type,
            choices=tuple(getattr(spec.output, "choices", ())),
            parents=reads[0],
            inputs=reads[1],
            children=(),
            trainable=layer is not None and layer.trainable,
            target=target,
            spec=spec,
            span=span,
            demos=layer.demos.count if layer and layer.demos else 0,
            calibration=spec.calibration,
        )

    @property
    def is_output(self) -> bool:
        return self.target is not None

    @property
    def has_targets(self) -> bool:
        """Whether the backward knows what this node should have output (data or posterior)."""
        return self.is_output or self.needs_posterior

    @property
    def fits_prior(self) -> bool:
        """Whether the fit estimates the node's label prior (a trainable calibrated choice layer)."""
        return self.trainable and self.output_type == "choice" and self.calibration != "none"

    @property
    def layer_key(self) -> tuple[NodeKind, str]:
        """The key of the node's layer kind in the runtime's one registry (runtime/layers)."""
        return (self.kind, self.output_type)


@dataclass(frozen=True)
class BatchedCall:
    """One batched backend call: `requests` items in a single list."""

    op: str  # "generate" | "score" | "think"
    # forward | posterior_sampling | child_rescoring | prompt_proposals | candidate_scoring | think
    # | step_selection | calibration (over train inputs) | content_free_calibration
    purpose: str
    backend: str
    nodes: tuple[str, ...]
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Stage:
    index: int
    nodes: tuple[str, ...]
    calls: tuple[BatchedCall, ...]


@dataclass(frozen=True)
class Estimate:
    calls: int
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, stages: tuple[Stage, ...], times: int = 1) -> "Estimate":
        """The calls of `stages`, made `times` times."""
        calls = [c for s in stages for c in s.calls]
        return cls(
            calls=len(calls) * times,
            requests=sum(c.requests for c in calls) * times,
            prompt_tokens=sum(c.prompt_tokens for c in calls) * times,
            completion_tokens=sum(c.completion_tokens for c in calls) * times,
        )

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class ExecutionPlan:
    spec: Spec
    spec_path: Path
    nodes: dict[str, PlanNode]  # sorted by name
    think: tuple[Stage, ...]  # one-time Deep-Thinking stage(s) before the forward
    forward: tuple[Stage, ...]
    backward: tuple[Stage, ...]
    data_paths: dict[str, Path]  # split -> absolute JSONL path
    evaluation: tuple[Stage, ...] = ()  # one dev evaluation (a forward over dev_size examples)
    # One estimate of the trainable calibrated choice layers' label priors, made before the
    # first dev evaluation and after every iteration (see compiler/schedule.py).
    calibration: tuple[Stage, ...] = ()
    spec_sha256: str = ""  # of the spec file's bytes; `load_plan` checks a saved plan is current

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def topological_order(self) -> list[str]:
        return [n for stage in self.forward for n in stage.nodes]

    def iterations(self, iterations: int | None = None) -> int:
        """Training iterations of a fit: `iterations` if given, else the spec's; none
        when nothing is trainable (the fit then only evaluates)."""
        if not any(n.trainable for n in self.nodes.values()):
            return 0
        return self.spec.train.iterations if iterations is None else iterations

    def evaluations(self, iterations: int | None = None) -> int:
        """Dev evaluations of a fit: before training and every `eval_every` iterations."""
        done = self.iterations(iterations)
        every = self.spec.train.eval_every
        # the last iteration is evaluated too when `eval_every` does not divide the iterations
        return done // every + 1 + (done % every != 0) if self.evaluation else 0

    def calibrations(self, iterations: int | None = None) -> int:
        """Label-prior estimates of a fit: before training and after every iteration."""
        return self.iterations(iterations) + 1 if self.calibration else 0

    @property
    def estimate_per_iteration(self) -> Estimate:
        return Estimate.of(self.forward + self.backward)

    def estimate(self, iterations: int | None = None) -> Estimate:
        """The whole fit's calls and tokens (the one place they are summed): the
        iterations (the spec's unless `iterations` is given), the label-prior estimates,
        the dev evaluations and the one-time Deep-Thinking stage."""
        return (
            Estimate.of(self.forward + self.backward, self.iterations(iterations))
            + Estimate.of(self.calibration, self.calibrations(iterations))
            + Estimate.of(self.evaluation, self.evaluations(iterations))
            + Estimate.of(self.think)
        )

    def to_dict(self) -> dict[str, Any]:
        def stage(s: Stage) -> dict[str, Any]:
            return {
                "index": s.index,
                "nodes": list(s.nodes),
                "calls": [_dataclass_dict(c) for c in s.calls],
            }

        return {
            "name": self.spec.name,
            "spec": self.spec_path.name,
            "nodes": {
                n: {k: v for k, v in _dataclass_dict(p).items() if k not in ("span", "spec")}
                for n, p in sorted(self.nodes.items())
            },
            "spec_sha256": self.spec_sha256,
            "think": [stage(s) for s in self.think],
            "forward": [stage(s) for s in self.forward],
            "backward": [stage(s) for s in self.backward],
            "evaluation": [stage(s) for s in self.evaluation],
            "evaluations": self.evaluations(),
            "calibration": [stage(s) for s in self.calibration],
            "calibrations": self.calibrations(),
            "estimate": {
                "per_iteration": _dataclass_dict(self.estimate_per_iteration),
                "fit": _dataclass_dict(self.estimate()),
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _dataclass_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted(obj.__dataclass_fields__):
        value = getattr(obj, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
