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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dlngraph import prompts as meta_prompts
from dlngraph import sandbox
from dlngraph.runtime.backends.base import GenerateRequest
from dlngraph.runtime.template import render
from dlngraph.spec import TrainSpec

T = TypeVar("T")

PROPOSAL_STOP = ("\n\n", "##", "[END]")


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
    return sandbox.render(meta_prompts.load(name), variables)


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
    correct: bool  # by the spec's `metric`


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
    turn); the answer is every proposal's text, stripped, in order (filter them
    with `filter_proposals` before scoring)."""
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

    return Deferred(backend, "generate", requests, lambda generations: [g.texts[0].strip() for g in generations])


# Words a proposal only uses when it talks about the meta-prompt's task (rewriting
# an instruction for a student) instead of giving the instruction itself.
_META_WORDS = frozenset({"instruction", "instructions", "student", "students", "rewrite", "re-write", "rewritten"})
_SCAFFOLD_NGRAM = 4


def filter_proposals(
    current: str, proposals: Sequence[str], directives: Sequence[str], taken: Sequence[str] = ()
) -> tuple[list[str], dict[str, int]]:
    """The proposals worth scoring, and how many were dropped per reason:
    `empty`; `duplicate` (of the current prompt, of `taken` candidates or of an
    earlier proposal); `scaffolding` (it copies the proposal meta-prompt: shares
    a run of 4 words with its fixed text or the directives, or uses words about
    rewriting instructions for a student, that the current prompt does not)."""
    scaffold = _ngrams(" ".join([_meta_text(), *directives])) - _ngrams(current)
    own_words = set(_words(current))
    seen = {current.strip(), *(t.strip() for t in taken)}
    kept: list[str] = []
    dropped = {"empty": 0, "duplicate": 0, "scaffolding": 0}
    for text in proposals:
        text = text.strip()
        if not text:
            dropped["empty"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        elif _ngrams(text) & scaffold or (set(_words(text)) - own_words) & _META_WORDS:
            dropped["scaffolding"] += 1
        else:
            kept.append(text)
            seen.add(text)
    return kept, dropped


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9'-]+", text.lower())


def _ngrams(text: str) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + _SCAFFOLD_NGRAM]) for i in range(len(words) - _SCAFFOLD_NGRAM + 1)}


def _meta_text() -> str:
    """The proposal meta-prompt's fixed text (its jinja tags and expressions removed)."""
    return re.sub(r"\{[{%#].*?[}%#]\}", " ", meta_prompts.load("proposal.jinja"), flags=re.S)


@dataclass(frozen=True)
class Selection(Generic[T]):
    candidate: T  # the chosen prompt (or layer parameters)
    index: int  # 0: the current one was kept
    objective: list[float]  # per candidate, what the argmax read
    loss: float  # mean negative log-likelihood of the targets under the chosen candidate
    dropped: dict[str, int] | None = None  # proposals filtered out before scoring, per reason


def select_candidate(
    candidates: Sequence[T],
    scores: Sequence[Sequence[TargetScore]],
    trust_region: float,
    current_outputs: Sequence[Sequence[TargetScore]] | None = None,
    masks: Sequence[Sequence[bool]] | None = None,
) -> Selection[T]:
    """The argmax over candidates of the batch's mean target log-likelihood minus
    `trust_region` x a divergence from the current candidate (index 0): for choice
    nodes KL(current || candidate) over the classes; for text nodes the drop in
    log-likelihood of the current outputs (`current_outputs`). `masks[i][b]`
    False leaves example b out of candidate i's mean (an example it shows as a
    demonstration would be scored as seen). Ties keep the earlier candidate, so
    the current one wins a tie."""
    means, objective = [], []
    for index, per_example in enumerate(scores):
        keep = masks[index] if masks is not None else [True] * len(per_example)
        means.append(_mean([s.logprob for s, k in zip(per_example, keep) if k]))
        divergence = _divergence(scores[0], per_example, current_outputs, index) if trust_region else 0.0
        objective.append(means[-1] - trust_region * divergence)
    best = max(range(len(candidates)), key=objective.__getitem__)
    return Selection(candidates[best], best, objective, -means[best])


def _divergence(
    current: Sequence[TargetScore],
    candidate: Sequence[TargetScore],
    current_outputs: Sequence[Sequence[TargetScore]] | None,
    index: int,
) -> float:
    if current[0].distribution is not None:  # a choice node: every score has its distribution
        return _mean([_kl(p.distribution or {}, q.distribution or {}) for p, q in zip(current, candidate)])
    if current_outputs is None:
        return 0.0
    return _mean([a.logprob - b.logprob for a, b in zip(current_outputs[0], current_outputs[index])])


def _kl(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    return sum(math.exp(lp) * (lp - q[c]) for c, lp in p.items() if lp > -math.inf)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
