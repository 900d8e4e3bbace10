"""Whether a prediction matches its target, per the spec's `metric`."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlngraph.compiler.plan import ExecutionPlan


def normalize(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces (SQuAD-style, lighter)."""
    return re.sub(r"\s+", " ", text.strip().strip(string.punctuation + " ").lower())


def is_correct(metric: str, prediction: str, target: str) -> bool:
    if metric == "exact_match":
        return normalize(prediction) == normalize(target)
    return prediction.strip() == target.strip()  # accuracy: labels must match exactly


def marks(plan: "ExecutionPlan", outputs: Mapping[str, str], example: Mapping[str, str]) -> dict[str, bool]:
    """Whether each output node of `plan` matches its target in `example`."""
    return {n: is_correct(plan.spec.metric, outputs[n], example[f]) for n, f in plan.spec.outputs.items()}


def accuracy(plan: "ExecutionPlan", outputs: Sequence[Mapping[str, str]], examples: Sequence[Mapping[str, str]]) -> float:
    """The share of examples whose every output matches (a prediction row's `correct`)."""
    if not examples:
        return 0.0
    return sum(all(marks(plan, out, ex).values()) for out, ex in zip(outputs, examples)) / len(examples)
