"""What every layer kind's backward half shares: deferred requests, seeds,
meta-prompts, posterior weighting and DLN-1 candidate selection.

Layers never call the backend in the backward pass: they return `Deferred`
requests (what to ask, and how to read the answers), so the trainer can merge
the requests of every node of a stage into ONE call per (backend, op, purpose),
as the plan's backward schedule says.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from dlngraph import prompts as meta_prompts
from dlngraph.runtime.backends.base import GenerateRequest
from dlngraph.runtime.template import render
from dlngraph.spec import TrainSpec

T = TypeVar("T")

PROPOSAL_STOP = ("\n\n", "##", "[END]")

_META_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


@dataclass(frozen=True)
class Deferred(Generic[T]):
    """Requests for one backend op, and how to turn their answers (in order) into a T."""

    backend: str
    op: str  # "generate" | "score"
    requests: list[Any]
    decode: Callable[[list[Any]], T]


@dataclass(frozen=True)
class TargetScore:
    """How likely a node's target is under one (prompt, row): a choice node's
    class-normalized log-prob (with the whole distribution) or a text node's
    mean token log-prob."""

    logprob: float
    distribution: dict[str, float] | None = None

    @property
    def predicted(self) -> str | None:
        # max() keeps the first of tied choices, like the forward.
        return max(self.distribution, key=self.distribution.__getitem__) if self.distribution else None


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from `parts` that is the same in every process (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def rng_for(seed: int, iteration: int, what: str) -> random.Random:
    """The generator of one random choice of one iteration; nothing else advances it,
    so a resumed run draws exactly what an uninterrupted one did."""
    return random.Random(stable_seed(seed, iteration, what))


def render_meta(name: str, **variables: Any) -> str:
    """A built-in meta-prompt (dlngraph/prompts/<name>) rendered with StrictUndefined."""
    return _META_ENV.from_string(meta_prompts.load(name)).render(**variables)


def shown_input(template: str, row: Mapping[str, str], *, node: str) -> str:
    """What a node read for one example, as meta-prompts show it: its template
    rendered without the learnable prompt."""
    return render(template, "", row, node=node).strip()


def run_now(deferred: Deferred[T], backend: Any) -> T:
    """Execute one deferred request list directly (outside the trainer's stage batching)."""
    return deferred.decode(getattr(backend, deferred.op)(deferred.requests) if deferred.requests else [])


# ---------------------------------------------------------------------- posterior


def posterior_weights(logits: Sequence[float], temperature: float) -> list[float]:
    """softmax(logits / T); -inf logits get weight 0, all -inf gives uniform."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    if top == -math.inf:
        return [1.0 / len(scaled)] * len(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def posterior_logits(
    prior: Sequence[float],
    children: Sequence[Sequence[TargetScore]],
    child_targets: Sequence[str],
    wrong_hidden_penalty: float,
) -> list[float]:
    """Per candidate: log p(candidate | inputs) + sum over children of log p(child target | candidate),
    minus the penalty once per choice child the candidate leads to a wrong answer."""
    out = []
    for index, logprob in enumerate(prior):
        total = logprob
        for scores, target in zip(children, child_targets):
            score = scores[index]
            total += score.logprob
            if wrong_hidden_penalty and score.predicted is not None and score.predicted != target:
                total -= wrong_hidden_penalty
        out.append(total)
    return out


# ---------------------------------------------------------------------- DLN-1 step


@dataclass(frozen=True)
class Attempt:
    """One example of a batch as the meta-prompt shows it."""

    input: str
    output: str
    target: str

    @property
    def correct(self) -> bool:
        return self.output.strip() == self.target.strip()


def meta_sample(attempts: Sequence[Attempt], count: int, rng: random.Random) -> tuple[list[Attempt], list[Attempt]]:
    """(successes, failures) to show: at most `count` in all, failures given half or more."""
    successes = [a for a in attempts if a.correct]
    failures = [a for a in attempts if not a.correct]
    rng.shuffle(successes)
    rng.shuffle(failures)
    n_fail = min(len(failures), max((count + 1) // 2, count - len(successes)))
    n_succ = min(len(successes), count - n_fail)
    return successes[:n_succ], failures[:n_fail]


def proposal_requests(
    backend: str, prompt: str, attempts: Sequence[Attempt], train: TrainSpec, rng: random.Random, seed: int
) -> Deferred[list[str]]:
    """N-1 proposals from one meta-prompt, proposal j asking for directive j (in
    turn); the answer is the current prompt plus every distinct non-empty
    proposal (identical proposals would be scored twice)."""
    successes, failures = meta_sample(attempts, train.meta_examples, rng)
    directives = train.proposal_directives
    requests = [
        GenerateRequest(
            prompt=render_meta(
                "proposal.jinja",
                prompt=prompt,
                successes=successes,
                failures=failures,
                directive=directives[j % len(directives)],
            ),
            max_tokens=train.proposal_max_tokens,
            temperature=train.backward_temperature,
            stop=PROPOSAL_STOP,
            seed=stable_seed(seed, j),
        )
        for j in range(train.prompt_proposals - 1)
    ]

    def decode(generations: list[Any]) -> list[str]:
        candidates = [prompt]
        for g in generations:
            proposal = g.texts[0].strip()
            if proposal and proposal not in candidates:
                candidates.append(proposal)
        return candidates

    return Deferred(backend, "generate", requests, decode)


@dataclass(frozen=True)
class Selection:
    prompt: str
    index: int  # 0: the current prompt was kept
    objective: list[float]  # per candidate, what the argmax read
    loss: float  # mean negative log-likelihood of the targets under the chosen prompt


def select_candidate(
    candidates: Sequence[str],
    scores: Sequence[Sequence[TargetScore]],
    trust_region: float,
    current_outputs: Sequence[Sequence[TargetScore]] | None = None,
) -> Selection:
    """The argmax over candidates of the batch's mean target log-likelihood minus
    `trust_region` x a divergence from the current prompt (index 0): for choice
    nodes KL(current || candidate) over the classes; for text nodes the drop in
    log-likelihood of the current outputs (`current_outputs`). Ties keep the
    earlier candidate, so the current prompt wins a tie."""
    objective = []
    for index, per_example in enumerate(scores):
        value = _mean([s.logprob for s in per_example])
        if trust_region:
            value -= trust_region * _divergence(scores[0], per_example, current_outputs, index)
        objective.append(value)
    best = max(range(len(candidates)), key=objective.__getitem__)
    return Selection(candidates[best], best, objective, -_mean([s.logprob for s in scores[best]]))


def _divergence(
    current: Sequence[TargetScore],
    candidate: Sequence[TargetScore],
    current_outputs: Sequence[Sequence[TargetScore]] | None,
    index: int,
) -> float:
    if current[0].distribution is not None:
        return _mean([_kl(p.distribution, q.distribution) for p, q in zip(current, candidate)])  # type: ignore[arg-type]
    if current_outputs is None:
        return 0.0
    return _mean([a.logprob - b.logprob for a, b in zip(current_outputs[0], current_outputs[index])])


def _kl(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    return sum(math.exp(lp) * (lp - q[c]) for c, lp in p.items() if lp > -math.inf)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
