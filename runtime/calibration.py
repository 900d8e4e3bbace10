"""Calibrating a choice node's label distribution: pure arithmetic, no model calls.

A small model prefers some labels whatever the input (SmolLM2-135M answers
`negative` to 250 of 250 mpqa test inputs). Calibration estimates that label
prior and divides it out:

- contextual calibration (Zhao et al. 2021, arXiv 2102.09690): the prior is the
  distribution the model gives to content-free inputs (`CONTENT_FREE`: "N/A",
  "" and "[MASK]" in place of every input field);
- batch calibration (Zhou et al., ICLR 2024): the prior is the mean over a batch
  of unlabeled inputs (the fit uses unlabeled train inputs, never dev or test).

Both priors are estimated the same way, by `estimate`, from the class-normalized
log-prob dicts that choice scoring returns, and removed by `apply`. The prior
is the mean *log*-prob per label (the papers average probabilities; the mean
log-prob is what was measured on the embedded model, in ../shared/OPTIMIZERS.md,
and one over-confident input cannot dominate it). Everything here maps
`{label: log-prob}` to `{label: log-prob}`, so callers (choice layers,
Deep-Thinking scores) keep their shapes.

Example (two labels, hand-checkable)::

    bias = estimate([{"a": log(0.9), "b": log(0.1)}, {"a": log(0.5), "b": log(0.5)}])
    # bias == {"a": (log 0.9 + log 0.5) / 2, "b": (log 0.1 + log 0.5) / 2}
    apply({"a": log(0.6), "b": log(0.4)}, bias)
    # == log-softmax of (log 0.6 - bias["a"], log 0.4 - bias["b"])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from dlngraph.spec import CONTENT_FREE_INPUTS as CONTENT_FREE


def content_free_rows(fields: Iterable[str]) -> list[dict[str, str]]:
    """One template row per content-free input, every field set to it."""
    names = sorted(fields)
    return [{f: text for f in names} for text in CONTENT_FREE]


def estimate(distributions: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The label prior: the mean log-prob of each label over `distributions`.

    An empty sequence gives no prior ({}), which `apply` treats as no calibration.
    A label with -inf log-prob somewhere keeps a -inf prior (it is never
    predicted there; `apply` then leaves it at -inf rather than inventing mass).
    """
    if not distributions:
        return {}
    labels = list(distributions[0])
    return {c: sum(d[c] for d in distributions) / len(distributions) for c in labels}


def apply(distribution: Mapping[str, float], bias: Mapping[str, float]) -> dict[str, float]:
    """`distribution` with the prior divided out and renormalized over the labels
    (log-softmax of log p(label) - bias[label]). Labels the bias does not name,
    and labels whose prior is -inf, are left unshifted."""
    if not bias:
        return dict(distribution)
    shifted = {c: lp - _finite(bias.get(c, 0.0)) for c, lp in distribution.items()}
    norm = logsumexp(list(shifted.values()))
    return {c: v - norm for c, v in shifted.items()}


def normalized(totals: Sequence[float], choices: Sequence[str]) -> list[dict[str, float]]:
    """Summed log-probs of every choice of every row (rows one after another,
    choices in order) as one class-normalized {choice: log-prob} per row."""
    out = []
    for start in range(0, len(totals), len(choices)):
        row = totals[start : start + len(choices)]
        norm = logsumexp(row)
        out.append({c: t - norm for c, t in zip(choices, row)})
    return out


def apply_all(distributions: Sequence[Mapping[str, float]], bias: Mapping[str, float]) -> list[dict[str, float]]:
    return [apply(d, bias) for d in distributions]


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def _finite(value: float) -> float:
    return 0.0 if math.isinf(value) else value
