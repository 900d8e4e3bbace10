"""A fit from start to end: the one object that owns a run directory while it trains.

`Fit.start(plan, out)` creates and locks a new run directory; `Fit.resume(run_dir,
plan)` locks an existing one, refuses a spec changed since the run started and
loads its last checkpoint (the one place resume lives). Either opens the spec's
backends behind the response cache (unless given some) and the tracker; `run()`
trains and closes what the fit opened, however it ends.

The loop around `Trainer.step`: initial evaluation (iteration 0), class-balanced
mini-batches, label priors estimated again after every step by the plan's
calibration calls, dev evaluation every `eval_every` (the plan's evaluation
calls), best-on-dev selection (accuracy, ties broken by dev log-likelihood), a
memory of the best parameters
fed back to the optimizer, backtracking to the best after `backtrack`
evaluations without gain, early stopping, and a checkpoint after every iteration.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from itertools import takewhile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlngraph.compiler.plan import ExecutionPlan, NodeKind
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime import calibration, demos
from dlngraph.runtime.backends.base import Backend, Usage
from dlngraph.runtime.backends.registry import open_backends
from dlngraph.runtime.backward import rng_for
from dlngraph.runtime.data import Example, read_split
from dlngraph.runtime.evaluation import Evaluation, evaluate
from dlngraph.runtime.executor import Executor
from dlngraph.runtime.layers import bind
from dlngraph.runtime.layers.base import Params
from dlngraph.runtime.optimizer import Optimizer
from dlngraph.runtime.plot import plot_curve
from dlngraph.runtime.rundir import RunDir, default_path
from dlngraph.runtime.tracking import Tracker, make_tracker, spec_params
from dlngraph.runtime.trainer import Events, StepResult, Trainer

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: RunDir
    prompts: dict[str, str]  # the last iteration's
    best: dict[str, Any]  # {"iteration", "dev_acc", "dev_loglik", "prompts", "demos", "calibration"}
    iterations: int  # completed
    stopped_early: bool


class Fit:
    """A fit over `run_dir` on `backends` (both the caller's when constructed directly;
    `start` and `resume` open them and `run` closes them); see the module docstring."""

    def __init__(
        self,
        plan: ExecutionPlan,
        backends: Mapping[str, Backend],
        run_dir: RunDir,
        *,
        seed: int | None = None,
        iterations: int | None = None,
        events: Events | None = None,
        tracker: Tracker | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.plan = plan
        self.backends = backends
        self.run_dir = run_dir
        self.seed = plan.spec.train.seed if seed is None else seed
        self.iterations = plan.iterations(iterations)
        self.events = events or Events()
        self.tracker = tracker or Tracker()
        self.optimizer = optimizer
        self.checkpoint: dict[str, Any] | None = None  # the state a resumed fit continues from
        self.trainer: Trainer | None = None
        self.calibration_set: list[Example] = []
        self.opened = ExitStack()  # what `start` / `resume` opened, closed when `run` ends

    @classmethod
    def start(cls, plan: ExecutionPlan, out: str | Path | None = None, **options: Any) -> "Fit":
        """A fit in a new run directory `out` (default runs/<name>-<time>); `options` are
        `open`'s and `Fit`'s keywords."""
        path = Path(out) if out is not None else default_path(plan.name)
        return cls.open(plan, RunDir.create(path, plan), **options)

    @classmethod
    def resume(cls, run_dir: str | Path, plan: ExecutionPlan, **options: Any) -> "Fit":
        """The fit of `run_dir` continued from its last checkpoint, with the seed it started with
        (a run killed before its first checkpoint starts again)."""
        run = RunDir.open(Path(run_dir))
        try:
            saved = run.saved_plan().get("spec_sha256")
            if saved and plan.spec_sha256 and saved != plan.spec_sha256:
                raise RuntimeFailure(
                    f"the spec {plan.spec_path} has changed since run {run_dir} started",
                    hint="resume with the spec the run was started with (a copy is in the run directory as spec.yaml)",
                )
            checkpoint = run.last_checkpoint()
            # Lines of iterations after the checkpoint are written again, so each appears once.
            run.truncate_after(checkpoint["iteration"] if checkpoint is not None else -1)
        except BaseException:
            run.close()
            raise
        fit = cls.open(plan, run, **options)
        fit.checkpoint = checkpoint
        if checkpoint is not None:
            fit.seed = checkpoint["seed"]
        return fit

    @classmethod
    def open(
        cls,
        plan: ExecutionPlan,
        run: RunDir,
        *,
        backends: Mapping[str, Backend] | None = None,
        cache_dir: str | Path | None = None,
        no_cache: bool = False,
        mlflow: bool = False,
        **options: Any,
    ) -> "Fit":
        """A fit that owns the locked `run`: it opens the plan's backends (unless given) and
        the tracker (MLflow when the spec or `mlflow` asks for it)."""
        with ExitStack() as opened:
            opened.callback(run.close)  # the run directory's lock: the next fit or resume may start
            if backends is None:
                backends = open_backends(plan, cache_dir=cache_dir, no_cache=no_cache)
                for backend in backends.values():
                    opened.callback(backend.close)
            tracker = make_tracker(plan.spec, mlflow=mlflow, run_name=run.path.name)
            fit = cls(plan, backends, run, tracker=tracker, **options)
            fit.opened = opened.pop_all()
        return fit

    def run(self) -> FitResult:
        """Train, reporting to the tracker; closes what `start` / `resume` opened."""
        with self.opened:
            self.tracker.start({**spec_params(self.plan.spec), "seed": str(self.seed)})
            status = "FAILED"
            try:
                result = self.train()
                status = "FINISHED"
                self.tracker.log_artifacts(self.run_dir.path)
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                self.tracker.end(status)
        return result

    def train(self) -> FitResult:
        train_set = read_split(self.plan, "train")
        dev_set = read_split(self.plan, "dev", limit=self.plan.spec.train.dev_size)
        # Label priors come from unlabeled train inputs, the same ones all fit long.
        draw = rng_for(self.seed, 0, "calibration").sample(train_set, min(self.plan.spec.train.calibration_size, len(train_set)))
        self.calibration_set = [{f: ex[f] for f in self.plan.spec.inputs} for ex in draw]
        layers = self.think(dev_set)
        self.trainer = Trainer(
            self.plan, self.backends, seed=self.seed, layers=layers, events=self.events, optimizer=self.optimizer
        )
        state = self.checkpoint or self.initial(dev_set)
        stopped = state["early_stop"]["stopped"]
        try:
            while not stopped and state["iteration"] < self.iterations:
                self.events.iteration(state["iteration"], self.iterations)
                state = self.iteration(state, train_set, dev_set)
                stopped = state["early_stop"]["stopped"]
        except KeyboardInterrupt:
            log.warning("interrupted: the last checkpoint is iteration %d", state["iteration"])
            raise
        self.events.iteration(state["iteration"], self.iterations)
        self.finish(state, dev_set)
        return FitResult(self.run_dir, state["prompts"], state["best"], state["iteration"], stopped)

    def think(self, dev_set: list[Example]) -> dict[str, Any]:
        """Deep-Thinking nodes tune their K/V state once (saved in the run dir, loaded on
        resume); they are not prompt-trained. A node reading upstream nodes selects T on
        dev rows holding their outputs under the spec's prompts."""
        layers: dict[str, Any] = {}
        for name in self.plan.topological_order:
            node = self.plan.nodes[name]
            if node.kind != NodeKind.DEEP_THINKING:
                continue
            layer: Any = bind(self.plan, name, self.backends[node.backend], self.run_dir.path)  # a DeepThinkingLayer
            self.events.call("think", 1)
            if node.parents and dev_set:
                executor = Executor(self.plan, self.backends, layers=layers, seed=self.seed)
                upstream = executor.run(dev_set, tuple(takewhile(lambda s: name not in s.nodes, self.plan.forward)))
                rows = executor.rows_for(name, dev_set, upstream)
                layer.prepare(dev_rows=rows, dev_targets=[ex[self.plan.spec.outputs.get(name, layer.spec.label_field)] for ex in dev_set])
            else:
                layer.prepare()
            layers[name] = layer
        return layers

    def initial(self, dev_set: list[Example]) -> dict[str, Any]:
        """Iteration 0: the spec's prompts (and demonstrations drawn with the fit's
        seed) evaluated on dev; they are the first best."""
        started, before = time.perf_counter(), self.usage()
        assert self.trainer is not None
        # The prior is estimated again from the fit's own calibration inputs, like every later one.
        params = self.calibrate({n: self.trainer.layers[n].params(self.seed).uncalibrated() for n in self.trainer.parameters()})
        dev = self.evaluate(params, dev_set)
        self.run_dir.write_predictions("initial", dev.predictions)
        best = _learned(params, iteration=0, dev_acc=dev.score, dev_loglik=dev.loglik)
        state = self.state(0, params, best, 0, False, [best] if dev_set and self.plan.spec.train.memory else [])
        self.record(0, None, dev.score, before, started)
        self.commit(state)
        return state

    def iteration(self, state: dict[str, Any], train_set: list[Example], dev_set: list[Example]) -> dict[str, Any]:
        iteration = state["iteration"] + 1
        started, before = time.perf_counter(), self.usage()
        train = self.plan.spec.train
        indices = self.batch_indices(train_set, iteration)
        assert self.trainer is not None
        memory = [_params(m) for m in state.get("memory", [])]
        step = self.trainer.step(_params(state), [train_set[i] for i in indices], indices, iteration, memory)
        params = self.calibrate(step.params)
        best, patience_used, remembered = state["best"], state["early_stop"]["evaluations_without_gain"], state.get("memory", [])
        dev_acc = None
        if dev_set and (iteration % train.eval_every == 0 or iteration == self.iterations):
            dev = self.evaluate(params, dev_set)
            dev_acc = dev.score
            entry = _learned(params, iteration=iteration, dev_acc=dev_acc, dev_loglik=dev.loglik)
            remembered = _remember(remembered, entry, train.memory)
            if _rank(entry) > _rank(best):
                best, patience_used = entry, 0
            else:
                patience_used += 1
                if train.backtrack and patience_used % train.backtrack == 0:
                    log.info("iteration %d: %d evaluations without gain, back to iteration %d", iteration, patience_used, best["iteration"])
                    params = _params(best)
        elif not dev_set:  # nothing to select on: the latest parameters are the result
            best = _learned(params, iteration=iteration, dev_acc=None, dev_loglik=None)
        stopped = patience_used >= train.patience
        self.record(iteration, step, dev_acc, before, started)
        new_state = self.state(iteration, params, best, patience_used, stopped, remembered)
        self.commit(new_state)
        if stopped:
            log.info("early stop after %d evaluations without gain", patience_used)
        return new_state

    def batch_indices(self, train_set: list[Example], iteration: int) -> list[int]:
        """The iteration's mini-batch: class-balanced (round-robin over the labels of
        the one output, as DLN's --balance_batch) unless told otherwise."""
        train = self.plan.spec.train
        rng = rng_for(self.seed, iteration, "batch")
        size = min(train.batch_size, len(train_set))
        outputs = list(self.plan.spec.outputs.items())
        if not train.balance_batch or len(outputs) != 1 or self.plan.nodes[outputs[0][0]].output_type != "choice":
            return sorted(rng.sample(range(len(train_set)), size))
        field_name = outputs[0][1]
        by_label: dict[str, list[int]] = {}
        for i, ex in enumerate(train_set):
            by_label.setdefault(ex[field_name], []).append(i)
        for group in by_label.values():
            rng.shuffle(group)
        labels = sorted(by_label)
        rng.shuffle(labels)
        chosen: list[int] = []
        while len(chosen) < size:
            for label in labels:
                if by_label[label] and len(chosen) < size:
                    chosen.append(by_label[label].pop())
        return sorted(chosen)

    def calibrate(self, params: dict[str, Params]) -> dict[str, Params]:
        """`params` with the label prior of every trainable calibrated choice layer
        estimated again, by exactly the plan's calibration calls: its stages over the
        fit's unlabeled train inputs, then the content-free stage over the content-free
        inputs (every input and node output set to them); deduplicated by the backends' memo."""
        if not self.plan.calibration or not self.calibration_set:
            return params
        assert self.trainer is not None
        executor = self.trainer.executor(params)
        over_train = tuple(s for s in self.plan.calibration if s.calls[0].purpose == "calibration")
        content_free = tuple(s for s in self.plan.calibration if s.calls[0].purpose == "content_free_calibration")
        records = executor.run(self.calibration_set, over_train).records
        if content_free:
            rows = calibration.content_free_rows([*self.plan.spec.inputs, *self.plan.nodes])
            records.update(executor.run(rows, content_free).records)
        out = dict(params)
        for n in sorted(records):
            if not self.plan.nodes[n].fits_prior:
                continue  # an ancestor whose outputs a batch-calibrated layer reads
            prior = records[n].extra.get("bias")
            assert isinstance(prior, dict), f"the choice layer {n} reports the prior it applied"
            out[n] = Params(params[n].prompt, params[n].demos, tuple(sorted(prior.items())))
        return out

    def state(
        self,
        iteration: int,
        params: Mapping[str, Params],
        best: dict[str, Any],
        without_gain: int,
        stopped: bool,
        memory: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """A checkpoint: all resume needs, as plain data. Random draws are derived from
        (seed, iteration, purpose), so the seed and the iteration are the whole RNG state."""
        return {
            "iteration": iteration,
            "seed": self.seed,
            **_learned(params),
            "best": best,
            "memory": memory,
            "early_stop": {"evaluations_without_gain": without_gain, "stopped": stopped},
            "rng": {"scheme": "sha256(seed, iteration, purpose)", "seed": self.seed, "next_iteration": iteration + 1},
        }

    def commit(self, state: dict[str, Any]) -> None:
        # The checkpoint goes last: a run killed before it repeats the iteration on resume.
        self.run_dir.save_best(state["best"])
        self.run_dir.save_checkpoint(state)

    def record(
        self, iteration: int, step: StepResult | None, dev_acc: float | None, before: Usage, started: float
    ) -> None:
        """One metrics.jsonl line (and the step's posterior samples); no step at iteration 0."""
        spent = self.usage() - before
        metrics = {
            "iteration": iteration,
            "train_acc": step.train_acc if step else None,
            "dev_acc": dev_acc,
            "loss": step.loss if step else {},
            "accepted": step.accepted if step else {},
            "dropped_proposals": step.dropped if step else {},
            "calls": spent.calls,
            "requests": spent.requests,
            "prompt_tokens": spent.prompt_tokens,
            "completion_tokens": spent.completion_tokens,
            "cost": spent.cost,
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.run_dir.append(self.run_dir.metrics, [metrics])
        self.run_dir.append(self.run_dir.posteriors, step.posteriors if step else [])
        self.tracker.log_metrics(iteration, metrics)
        log.info("iteration %d: train %s dev %s accepted %s", iteration, metrics["train_acc"], dev_acc,
                 metrics["accepted"])

    def usage(self) -> Usage:
        total = Usage()
        for backend in self.backends.values():
            total.add(backend.usage)
        return total

    def evaluate(self, params: Mapping[str, Params], examples: list[Example]) -> Evaluation:
        """The output nodes on `examples`: the plan's evaluation calls (`runtime.evaluation`)."""
        assert self.trainer is not None
        return evaluate(self.trainer.executor(params), examples, stages=self.plan.evaluation)

    def finish(self, state: dict[str, Any], dev_set: list[Example]) -> None:
        self.run_dir.write_predictions("best", self.evaluate(_params(state["best"]), dev_set).predictions)
        plot_curve(self.run_dir.read(self.run_dir.metrics), self.run_dir.curve, self.plan.name)


def _learned(params: Mapping[str, Params], **fields: Any) -> dict[str, Any]:
    """Layer parameters as plain checkpoint data: `prompts`, and `demos` / `calibration`
    for the nodes that have them, after `fields`."""
    return {
        **fields,
        "prompts": {n: p.prompt for n, p in sorted(params.items())},
        "demos": {n: p.demo_dicts() for n, p in sorted(params.items()) if p.demos},
        "calibration": {n: p.bias_dict() for n, p in sorted(params.items()) if p.bias is not None},
    }


def _params(data: Mapping[str, Any]) -> dict[str, Params]:
    """Parameters back from checkpoint data (`_learned`'s inverse)."""
    shown, priors = data.get("demos") or {}, data.get("calibration") or {}
    return {
        n: Params(
            prompt,
            demos.from_dicts(shown.get(n, [])),
            tuple(sorted(priors[n].items())) if n in priors else None,
        )
        for n, prompt in data["prompts"].items()
    }


def _rank(entry: Mapping[str, Any]) -> tuple[float, float]:
    """Best-on-dev order: accuracy, ties broken by the targets' dev log-likelihood."""
    acc, loglik = entry.get("dev_acc"), entry.get("dev_loglik")
    return (-math.inf if acc is None else acc, -math.inf if loglik is None else loglik)


def _remember(memory: list[dict[str, Any]], entry: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """The `size` best distinct parameter sets seen on dev, best first (the earlier of equals)."""
    key = lambda e: (e["prompts"], e["demos"])  # noqa: E731 - same parameters, whatever their prior
    kept = [m for m in memory if key(m) != key(entry)] + [entry]
    kept.sort(key=lambda e: (_rank(e), -e["iteration"]), reverse=True)
    return kept[:size]

