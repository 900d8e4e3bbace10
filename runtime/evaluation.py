"""Scoring a network on examples: the one evaluation path of `dlngraph eval`,
`dlngraph.evaluate` and the fit's dev evaluations.

`evaluate` runs an `Executor` over the examples in batches, marks every output
node against its target per the spec's `metric` (`runtime.metrics`) and returns
an `Evaluation`. Its prediction rows are what `eval --out` and the run
directory's `predictions/dev-*.jsonl` hold and what the report reads, one JSON
object per example:

    {"index": 0, "input": "...", "target": "...", "prediction": "...", "correct": true}

`index` is the example's position in the split. With several input fields,
`input` is a {field: value} mapping; with several output nodes, `target` and
`prediction` are {node: value} mappings. `correct` means every output matched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dlngraph.runtime.backends.base import Usage
from dlngraph.runtime.metrics import marks

if TYPE_CHECKING:
    from dlngraph.compiler.plan import ExecutionPlan, Stage
    from dlngraph.runtime.executor import Executor


@dataclass
class Evaluation:
    split: str
    metric: str
    correct: int  # examples whose every output matched
    total: int
    per_output: dict[str, float]  # output node -> the share of examples it got right
    predictions: list[dict[str, Any]]  # one prediction row per example, in order
    loglik: float | None = None  # mean log-prob of the targets of choice outputs; None without any
    usage: dict[str, Usage] = field(default_factory=dict)  # backend -> what this evaluation spent

    @property
    def score(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def model_calls(self) -> int:
        """Batched calls that reached a model (cache hits excluded)."""
        return sum(u.calls for u in self.usage.values())


def evaluate(
    executor: Executor,
    examples: Sequence[Mapping[str, str]],
    *,
    split: str = "dev",
    batch_size: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    stages: Sequence[Stage] | None = None,
) -> Evaluation:
    """Score the plan's output nodes on `examples`, `batch_size` examples per batched call
    (all at once by default), running `stages` (the plan's forward by default; a fit's
    dev evaluation runs `plan.evaluation`); `on_batch(done, total)` reports progress."""
    plan, backends = executor.plan, executor.backends
    targets = plan.spec.outputs
    before = {name: b.usage.copy() for name, b in backends.items()}
    size = batch_size or max(len(examples), 1)
    rows: list[dict[str, Any]] = []
    hits = dict.fromkeys(targets, 0)
    logprobs: list[float] = []
    for start in range(0, len(examples), size):
        batch = examples[start : start + size]
        result = executor.run(batch, stages)
        for offset, example in enumerate(batch):
            outputs = result.outputs(offset)
            marked = marks(plan, outputs, example)
            for node, ok in marked.items():
                hits[node] += ok
            rows.append(prediction_row(plan, start + offset, example, outputs, all(marked.values())))
        logprobs += [
            record.choice_logprobs[i][example[targets[node]]]
            for node, record in sorted(result.records.items())
            if node in targets and record.choice_logprobs is not None
            for i, example in enumerate(batch)
        ]
        if on_batch is not None:
            on_batch(start + len(batch), len(examples))
    total = len(examples)
    return Evaluation(
        split=split,
        metric=plan.spec.metric,
        correct=sum(row["correct"] for row in rows),
        total=total,
        per_output={node: hits[node] / total if total else 0.0 for node in sorted(targets)},
        predictions=rows,
        loglik=round(sum(logprobs) / len(logprobs), 6) if logprobs else None,
        usage={name: b.usage - before[name] for name, b in backends.items()},
    )


def prediction_row(
    plan: ExecutionPlan, index: int, example: Mapping[str, str], outputs: Mapping[str, str], correct: bool
) -> dict[str, Any]:
    """One prediction row (see the module docstring)."""
    spec = plan.spec

    def one_or_all(values: dict[str, str]) -> str | dict[str, str]:
        return next(iter(values.values())) if len(values) == 1 else values

    return {
        "index": index,
        "input": one_or_all({f: example[f] for f in spec.inputs}),
        "target": one_or_all({n: example[f] for n, f in sorted(spec.outputs.items())}),
        "prediction": one_or_all({n: outputs[n] for n in sorted(spec.outputs)}),
        "correct": correct,
    }
