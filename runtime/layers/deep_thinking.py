"""Deep-Thinking nodes: iterative forward tuning of attention K/V (arXiv 2305.13016).

The layer owns both halves, as the authors' code does them:

- `think`: let x be the rendered demonstrations (L tokens). Pass 1 is a plain
  forward of x; its key/value cache is the state (fp32) -- this alone is
  ordinary in-context learning. Each later pass feeds x again with the state
  as the past cache (mask all ones over 2L, positions L..2L-1, so RoPE
  models see the demonstrations shifted, as in the authors' code), takes the
  last L positions of the returned cache as (K_new, V_new) and moves the state
  with momentum: g = new - state; m = g on the first update, else
  g + beta * m; state += eta * m. beta = 0 is the paper's gate form
  K_t = eta * K_new + (1 - eta) * K_{t-1}.
- `forward`: each query is answered from the state alone, as a prefix cache
  (mask [ones(L) | query mask], query positions from L): the answer is the
  choice whose tokens have the largest summed log-prob, normalized over the
  choices. The layer `hold`s its state on the torch backend's K/V engine and
  sends ordinary `score` requests naming it by content digest: they batch,
  deduplicate and cache (keyed on the digest) like any other layer's.
- `select_steps`: T is chosen on dev data (never test) in ONE thinking run,
  evaluating the state after each pass 1..max_steps; the best accuracy wins
  (ties: higher mean log-prob of the target, then smaller T).
- `calibration` (contextual / batch): the decisions read the choice scores
  with the label prior divided out (`dlngraph.runtime.calibration`, as choice
  layers do), the prior estimated from the same state on extra rows of the
  same score call (content-free inputs, or train inputs), so each T has its own.
- `changes`: ||eta * m|| / ||state|| and ||new - state|| / ||state|| for K and
  V per pass: how far thinking moved the state, whatever accuracy did.

Against the authors' code (DAMO-ConvAI deep-thinking `models/meta_optimizer.py`,
`MomentumOptim` and `AttnOptimWrapper.step`), line by line:

- pass 1, `self.kv is None`: a plain forward of the demonstrations, the cache
  kept as the state -- same.
- later passes: `mask.repeat(1, 2)` over [state | x], positions left to the
  model (L..2L-1 for GPT-2/OPT/Llama with a past of length L) -- same; we pass
  the positions explicitly so it holds for any model.
- `cur_kv = layer_k[:, :, -L:]` (and V) -- same (`length:` of a 2L cache).
- `pesudo_gs = new_x - old_x`; `self.m = g` if `not self.m` else
  `g + momentum * old_m`; `old_x + step_size * m`, separate optimizers for K
  and V -- same (one momentum list holds K then V; the arithmetic is per tensor).
- defaults `step_size=0.01`, `momentum=0.9` -- same spec defaults.
- state precision: theirs stays in the model's dtype (fp32 for their GPT-2/OPT
  runs, fp16 for LLaMA); ours is fp32 whatever the model's dtype and is cast
  for each forward, so in bf16 small steps are not rounded away (a deliberate
  difference: DEEP_THINKING.md's precision pitfall).
- test: theirs scores each choice after the tuned cache and takes the argmax
  -- same; their drivers print the best pass on *test*, ours selects T on dev.

API for the trainer (`dlngraph fit`) and for `eval` / `run`:

    layer = DeepThinkingLayer.from_plan(plan, "answer", backend, run_dir=run_dir)
    state = layer.prepare()                      # demos and dev rows from the plan's data
    state = layer.prepare(demos, dev_rows, dev_targets, run_dir)   # or given explicitly
    record = layer.forward(rows)                 # a ForwardRecord, like choice layers
    deferred = layer.target_scores(items)        # child rescoring: "score" requests on the node's backend

`prepare` renders the demonstrations, loads `run_dir/deep_thinking/<node>.safetensors`
when it was made from the same demonstrations, model and eta/beta (and refuses
with a RuntimeFailure when it was not), otherwise thinks (selecting T on dev
unless the spec fixes `steps`) and saves the state there. Dev rows must carry
the node's template variables; when the node reads upstream nodes, the caller
passes dev rows holding their outputs (the executor's `rows_for`). `forward`
prepares on first use, so `Executor(plan, backends, layers={name: layer})` with
a layer from `from_plan` works for `eval` / `run`; a layer built with only
(node, backend) can think on the fly only from an explicit
`demonstrations.examples` list. The backend must have a K/V-prefix engine
(`KVPrefixScoring`: the torch backend, itself or behind the response cache);
templates are read as plain text (no chat wrapping).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dlngraph.compiler.plan import ExecutionPlan, PlanNode
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime import calibration
from dlngraph.runtime.backends.base import Backend, KVPrefixScoring, Score, ScoreRequest
from dlngraph.runtime.backward import Deferred, TargetScore, run_now
from dlngraph.runtime.cache import CachedBackend
from dlngraph.runtime.data import read_jsonl
from dlngraph.runtime.kv_state import KVState, StateMeta, load_state
from dlngraph.runtime.layers.base import ForwardRecord, Params, Row, check_targets
from dlngraph.runtime.template import render, score_request
from dlngraph.spec import DeepThinkingNode

log = logging.getLogger(__name__)

DEMO_SEPARATOR = "\n\n"  # between demonstrations, and between them and the query


def state_path(run_dir: Path, node: str) -> Path:
    from dlngraph.runtime.rundir import RunDir  # the run directory names its files

    return RunDir(run_dir).deep_thinking_state(node)


@dataclass(frozen=True)
class StepScore:
    """Dev evaluation of the state after `steps` thinking passes."""

    steps: int
    accuracy: float
    mean_target_logprob: float


@dataclass(frozen=True)
class StepChange:
    """How far pass `steps` moved the state, relative to its size (all layers
    together, Frobenius norms): `*_update` is ||eta * m|| / ||state||, the step
    actually taken; `*_gradient` is ||new - state|| / ||state||, what the pass
    proposed before eta and momentum."""

    steps: int
    key_update: float
    value_update: float
    key_gradient: float
    value_gradient: float


def step_score(steps: int, scored: Sequence[Mapping[str, float]], targets: Sequence[str]) -> StepScore:
    hits = [max(lp, key=lp.__getitem__) == t for lp, t in zip(scored, targets)]
    return StepScore(steps, sum(hits) / len(hits), sum(lp[t] for lp, t in zip(scored, targets)) / len(hits))


def best_step(curve: Sequence[StepScore]) -> StepScore:
    """Highest dev accuracy; ties: higher mean target log-prob, then smaller T."""
    return max(curve, key=lambda p: (p.accuracy, p.mean_target_logprob, -p.steps))


def kv_engine(backend: Backend, node: str) -> KVPrefixScoring:
    """The K/V-prefix engine behind `backend`: itself, or the one a response cache wraps."""
    engine = backend.kv_engine() if isinstance(backend, CachedBackend) else backend
    if not isinstance(engine, KVPrefixScoring):
        raise RuntimeFailure(
            f"the {backend.kind} backend has no K/V access", node=node, hint="deep_thinking nodes run on a torch backend"
        )
    return engine


def relative_norm(delta: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> float:
    num = math.fsum(float(d.double().pow(2).sum()) for d in delta)
    den = math.fsum(float(b.double().pow(2).sum()) for b in base)
    return math.sqrt(num / den) if den > 0 else math.inf


class DeepThinkingLayer:
    def __init__(
        self,
        node: PlanNode,
        backend: Backend,
        *,
        data_paths: Mapping[str, Path] | None = None,
        run_dir: Path | None = None,
        dev_size: int | None = None,
        calibration_size: int = 32,
    ) -> None:
        assert isinstance(node.spec, DeepThinkingNode), f"{node.name} is not a deep_thinking node"
        self.node = node
        self.name = node.name
        self.spec = node.spec
        self.backend = backend
        self.engine = kv_engine(backend, node.name)
        self.data_paths = dict(data_paths or {})
        self.run_dir = run_dir
        self.dev_size = dev_size
        self.calibration_size = calibration_size
        self.state: KVState | None = None
        self.curve: list[StepScore] = []  # dev accuracy per T, when T was selected
        self.changes: list[StepChange] = []  # per pass >= 2 of the last thinking run

    @classmethod
    def from_plan(
        cls, plan: ExecutionPlan, name: str, backend: Backend, run_dir: Path | None = None
    ) -> "DeepThinkingLayer":
        return cls(
            plan.nodes[name],
            backend,
            data_paths=plan.data_paths,
            run_dir=run_dir,
            dev_size=plan.spec.train.dev_size,
            calibration_size=plan.spec.train.calibration_size,
        )

    # ------------------------------------------------------------------ inputs

    def demonstrations(self) -> list[Row]:
        """The spec's explicit examples, or `count` rows of its split drawn with `seed`."""
        demos = self.spec.demonstrations
        if demos.examples is not None:
            return [dict(e) for e in demos.examples]
        path = self.data_paths.get(demos.split)
        if path is None:
            raise RuntimeFailure(
                f"the demonstrations come from the '{demos.split}' split, which is not available here",
                node=self.name,
                hint="build the layer with DeepThinkingLayer.from_plan, or list `demonstrations.examples`",
            )
        rows = read_jsonl(Path(path), [self.spec.label_field])
        if len(rows) < demos.count:
            raise RuntimeFailure(
                f"the '{demos.split}' split has {len(rows)} examples, fewer than the {demos.count} "
                "demonstrations asked for",
                node=self.name,
            )
        return [rows[i] for i in random.Random(demos.seed).sample(range(len(rows)), demos.count)]

    def demo_text(self, demos: Sequence[Mapping[str, str]]) -> str:
        """x: every demonstration rendered, each followed by the separator."""
        label = self.spec.label_field
        parts = []
        for index, demo in enumerate(demos):
            if label not in demo:
                raise RuntimeFailure(f"demonstration {index} has no field {label!r}", node=self.name)
            parts.append(render(self.spec.demo_template, "", {**demo, "label": demo[label]}, node=self.name))
        return "".join(p + DEMO_SEPARATOR for p in parts)

    def split_rows(self, split: str, fields: Sequence[str], limit: int | None, purpose: str, hint: str) -> list[Row]:
        """Rows of a data split, for `purpose`; the split holds only the dataset's
        fields, so a node fed by upstream nodes cannot use it directly."""
        if self.node.parents:
            raise RuntimeFailure(
                f"{purpose} needs the outputs of the upstream node(s) {', '.join(self.node.parents)}",
                node=self.name,
                hint=hint,
            )
        path = self.data_paths.get(split)
        if path is None:
            raise RuntimeFailure(
                f"{purpose} needs the {split} split", node=self.name, hint=f"add `data.{split}` to the spec, or {hint}"
            )
        return read_jsonl(Path(path), list(fields), limit=limit)

    def dev_data(self) -> tuple[list[Row], list[str]]:
        target = self.node.target or self.spec.label_field
        examples = self.split_rows(
            "dev", [*self.node.inputs, target], self.dev_size, "selecting T on dev",
            "pass dev rows to prepare() (dlngraph fit does), or fix `steps` in the spec",
        )
        return [{f: e[f] for f in self.node.inputs} for e in examples], [e[target] for e in examples]

    # ------------------------------------------------------------------ think

    def meta(self, text: str, length: int, steps: int) -> StateMeta:
        return StateMeta(
            node=self.name,
            model=self.engine.identity,
            tokenizer=self.engine.tokenizer_name(),
            eta=self.spec.eta,
            beta=self.spec.beta,
            steps=steps,
            length=length,
            dtype="float32",
            demos_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            calibration=self.spec.calibration,
        )

    def think_steps(self, text: str) -> Iterator[KVState]:
        """The state after pass 1, 2, 3, ... (one object, updated in place between yields).

        Each pass >= 2 appends a `StepChange` to `self.changes` (logged too), so a
        run says how far the state moved, not only whether accuracy did."""
        ids = self.engine.token_ids(text)
        length = len(ids)
        if length == 0:
            raise RuntimeFailure("the rendered demonstrations are empty", node=self.name)
        self.engine.check_context(
            2 * length, "thinking (the demonstrations twice)", node=self.name, hint="use fewer or shorter demonstrations"
        )
        self.changes = []
        state = KVState(*self.engine.kv_forward(ids, None), self.meta(text, length, steps=1))
        yield state
        layers = len(state.keys)
        momentum: list[torch.Tensor] | None = None
        while True:
            with torch.no_grad():
                new_keys, new_values = self.engine.kv_forward(ids, state)
                new = new_keys + new_values
                current = state.keys + state.values
                grads = [n - s for n, s in zip(new, current)]
                momentum = grads if momentum is None else [g + self.spec.beta * m for g, m in zip(grads, momentum)]
                change = StepChange(
                    state.meta.steps + 1,
                    key_update=self.spec.eta * relative_norm(momentum[:layers], current[:layers]),
                    value_update=self.spec.eta * relative_norm(momentum[layers:], current[layers:]),
                    key_gradient=relative_norm(grads[:layers], current[:layers]),
                    value_gradient=relative_norm(grads[layers:], current[layers:]),
                )
                for s, m in zip(current, momentum):
                    s.add_(m, alpha=self.spec.eta)
            self.changes.append(change)
            log.info(
                "%s: pass %d moved K by %.2e and V by %.2e of their norm (pass proposed %.2e, %.2e)",
                self.name, change.steps, change.key_update, change.value_update,
                change.key_gradient, change.value_gradient,
            )
            state.meta = replace(state.meta, steps=state.meta.steps + 1)
            yield state

    def think(self, text: str, steps: int) -> KVState:
        """The state after exactly `steps` passes over `text`."""
        for state in self.think_steps(text):
            if state.meta.steps == steps:
                return state
        raise AssertionError("think_steps ended")  # it is infinite

    def select_steps(
        self, text: str, dev_rows: Sequence[Row], dev_targets: Sequence[str], max_steps: int | None = None
    ) -> KVState:
        """The state after the T in 1..max_steps that scores best on dev (one thinking run)."""
        if not dev_rows:
            raise RuntimeFailure("selecting T on dev needs at least one dev example", node=self.name)
        check_targets(dev_targets, self.spec.choices, self.name)
        max_steps = max_steps or self.spec.max_steps
        best: tuple[StepScore, KVState] | None = None
        self.curve = []
        for state in self.think_steps(text):
            point = step_score(state.meta.steps, self.choice_logprobs(state, dev_rows), dev_targets)
            self.curve.append(point)
            log.info("%s: T=%d dev accuracy %.3f", self.name, point.steps, point.accuracy)
            if best is None or best_step([best[0], point]) is point:
                best = (point, state.clone())
            if state.meta.steps >= max_steps:
                break
        assert best is not None
        return best[1]

    def prepare(
        self,
        demos: Sequence[Mapping[str, str]] | None = None,
        dev_rows: Sequence[Row] | None = None,
        dev_targets: Sequence[str] | None = None,
        run_dir: Path | None = None,
    ) -> KVState:
        """Load or learn the state (see the module docstring); keeps it on the layer."""
        run_dir = run_dir or self.run_dir
        text = self.demo_text(self.demonstrations() if demos is None else demos)
        fixed = self.spec.steps or (None if self.spec.select_steps_on == "dev" else self.spec.max_steps)
        path = state_path(run_dir, self.name) if run_dir is not None else None
        if path is not None and path.is_file():
            length = len(self.engine.token_ids(text))
            self.state = load_state(path, self.meta(text, length, fixed or 0), compare_steps=fixed is not None)
            log.info("%s: loaded Deep-Thinking state %s (T=%d)", self.name, path, self.state.meta.steps)
            return self.state
        started = time.perf_counter()
        if fixed is not None:
            state = self.think(text, fixed)
        else:
            if dev_rows is None or dev_targets is None:
                dev_rows, dev_targets = self.dev_data()
            state = self.select_steps(text, dev_rows, dev_targets)
        seconds = time.perf_counter() - started
        log.info("%s: thought T=%d over %d tokens in %.1f s", self.name, state.meta.steps, state.length, seconds)
        if path is not None:
            state.save(path)
        self.state = state
        return state

    # ------------------------------------------------------------------ forward

    def queries(self, rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
        """(rendered query, continuation of every choice) per row, by the choice layers' rule."""
        texts = [render(self.spec.template, "", row, node=self.name) for row in rows]
        continuations = [
            [score_request(self.spec.template, "", row, c, node=self.name).continuation for c in self.spec.choices]
            for row in rows
        ]
        return texts, continuations

    def distributions(
        self, state: KVState | None, rows: Sequence[Row], *, calibrated: bool = True
    ) -> Deferred[list[dict[str, float]]]:
        """Every choice of every row as score requests answered from `state` (None:
        zero-shot), read back as class-normalized log-probs, with the node's
        calibration applied unless `calibrated` is False. The label prior comes
        from extra rows scored in the same call under the same state (thinking
        changes the prior, so each state gets its own)."""
        method = self.spec.calibration if calibrated else "none"
        extra = [] if method == "none" else self.prior_rows(method)
        digest = self.engine.hold(self.name, state) if state is not None else ""
        texts, continuations = self.queries([*rows, *extra])
        requests = [
            ScoreRequest(prompt=text, continuation=c, state=digest) for text, cs in zip(texts, continuations) for c in cs
        ]

        def decode(scores: list[Score]) -> list[dict[str, float]]:
            normalized = calibration.normalized([s.total for s in scores], self.spec.choices)
            own = normalized[: len(rows)]
            if method == "none":
                return own
            return calibration.apply_all(own, calibration.estimate(normalized[len(rows) :]))

        return Deferred(self.node.backend, "score", requests, decode)

    def choice_logprobs(
        self, state: KVState | None, rows: Sequence[Row], *, calibrated: bool = True
    ) -> list[dict[str, float]]:
        """`distributions`, scored now: what every decision reads."""
        return run_now(self.distributions(state, rows, calibrated=calibrated), self.backend)

    def prior_rows(self, method: str) -> list[Row]:
        """The inputs the label prior is estimated on: content-free ones, or
        unlabeled train inputs for batch calibration (never dev or test)."""
        if method == "contextual":
            return calibration.content_free_rows(self.node.inputs)
        examples = self.split_rows(
            "train", self.node.inputs, self.calibration_size, "batch calibration", "use `calibration: contextual`"
        )
        return [{f: e[f] for f in self.node.inputs} for e in examples]

    def target_scores(self, items: Sequence[tuple[Params, Row, str]]) -> Deferred[list[TargetScore]]:
        """How likely each (params, row, target) is under the prepared state: the
        target's class-normalized (calibrated) log-prob with the whole distribution,
        as score requests on the node's backend that the trainer batches with any
        other. The params are not read: the state, not a prompt, answers."""
        check_targets((target for _, _, target in items), self.spec.choices, self.name)
        inner = self.distributions(self.state or self.prepare(), [row for _, row, _ in items])

        def decode(scores: list[Score]) -> list[TargetScore]:
            return [TargetScore(lp[target], lp) for (_, _, target), lp in zip(items, inner.decode(scores))]

        return Deferred(inner.backend, inner.op, inner.requests, decode)

    def params(self, seed: int) -> Params:
        """Nothing to learn by prompt: the K/V state answers (the layer protocol's parameters)."""
        return Params("")

    def forward(self, rows: list[Row], params: Params | None = None, *, seed: int = 0) -> ForwardRecord:
        # (the layer protocol's signature: a Deep-Thinking node has no prompt, its K/V state answers)
        started = time.perf_counter()
        state = self.state or self.prepare()
        scored = self.choice_logprobs(state, rows)
        # max() keeps the first of tied choices, so ties break by the spec's order.
        outputs = [max(self.spec.choices, key=lp.__getitem__) for lp in scored]
        return ForwardRecord(
            node=self.name,
            prompt="",
            rendered=self.queries(rows)[0],
            outputs=outputs,
            choice_logprobs=scored,
            seconds=time.perf_counter() - started,
            extra={"steps": state.meta.steps, "demo_tokens": state.length},
        )
