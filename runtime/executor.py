"""The forward executor: an interpreter over the plan's forward stages.

Like torch.fx's `Interpreter`: `run` walks the stages (the plan's `forward`, its
`evaluation` or its `calibration`), `run_node` runs the node's layer, bound through the one
registry of layer kinds (runtime/layers); a mode needing other semantics
subclasses it. Every node is ONE batched backend call over all rows
of the batch. Nodes of a stage that use different backends run concurrently
(one thread per backend; nodes sharing a backend run one after another, so
each node's usage is the difference of its backend's counters). Errors carry
the node's name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dlngraph.compiler.plan import ExecutionPlan, Stage
from dlngraph.errors import DlngraphError, RuntimeFailure
from dlngraph.runtime.backends.base import Backend, Usage
from dlngraph.runtime.demos import from_dicts
from dlngraph.runtime.layers import bind
from dlngraph.runtime.layers.base import ForwardRecord, Layer, Params, Row


@dataclass
class RunResult:
    records: dict[str, ForwardRecord]  # node -> its forward over the batch
    usage: dict[str, Usage] = field(default_factory=dict)  # node -> calls, tokens, seconds

    def outputs(self, index: int) -> dict[str, str]:
        """Every node's output for example `index`."""
        return {name: record.outputs[index] for name, record in self.records.items()}


class Executor:
    """Runs `plan` on `backends` (name -> backend), with learned parameters overriding the
    spec's: `prompts`, `demos` ({node: [demonstration dicts]}) and `calibration`
    ({node: {label: prior}}) as a checkpoint holds them, or whole `params` per node."""

    def __init__(
        self,
        plan: ExecutionPlan,
        backends: Mapping[str, Backend],
        prompts: Mapping[str, str] | None = None,
        *,
        layers: Mapping[str, Layer] | None = None,
        run_dir: Path | None = None,
        seed: int = 0,
        demos: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
        calibration: Mapping[str, Mapping[str, float]] | None = None,
        params: Mapping[str, Params] | None = None,
    ) -> None:
        self.plan = plan
        self.backends = backends
        self.prompts = dict(prompts or {})
        self.demos = {n: from_dicts(ds) for n, ds in (demos or {}).items()}
        self.calibration = {n: tuple(sorted(b.items())) for n, b in (calibration or {}).items()}
        self.params = dict(params or {})
        self.layers = dict(layers or {})  # bound layers, given ones first (e.g. a learned Deep-Thinking state)
        self.run_dir = run_dir  # where Deep-Thinking states are saved and found
        self.seed = seed
        unknown = sorted((set(self.prompts) | set(self.demos) | set(self.calibration) | set(self.params)) - set(plan.nodes))
        if unknown:
            raise RuntimeFailure(
                f"prompts given for unknown node(s) {', '.join(unknown)}",
                hint=f"the spec's nodes are {', '.join(sorted(plan.nodes))}",
            )

    def params_of(self, name: str) -> Params:
        """A node's parameters: given ones, else its layer's (the spec's, with
        demonstrations drawn by the spec's train seed, as the fit starts from), each part
        overridable by a checkpoint's prompt, demonstrations and fitted prior."""
        if name in self.params:
            return self.params[name]
        spec = self.layer(name).params(self.plan.spec.train.seed)
        return Params(
            self.prompts.get(name, spec.prompt), self.demos.get(name, spec.demos), self.calibration.get(name, spec.bias)
        )

    def layer(self, name: str) -> Layer:
        """Node `name`'s layer: a given one, else bound once from the registry."""
        layer = self.layers.get(name)
        if layer is None:
            layer = self.layers[name] = bind(self.plan, name, self.backends[self.plan.nodes[name].backend], self.run_dir)
        return layer

    def run(self, examples: Sequence[Mapping[str, str]], stages: Sequence[Stage] | None = None) -> RunResult:
        """The plan's forward stages over `examples` (or `stages`, e.g. `plan.evaluation`)."""
        result = RunResult(records={})
        for stage in self.plan.forward if stages is None else stages:
            self.run_stage(stage, examples, result)
        return result

    def run_stage(self, stage: Stage, examples: Sequence[Mapping[str, str]], result: RunResult) -> None:
        by_backend: dict[str, list[str]] = {}
        for name in stage.nodes:
            by_backend.setdefault(self.plan.nodes[name].backend, []).append(name)

        def run_group(names: list[str]) -> list[tuple[str, ForwardRecord, Usage]]:
            return [(name, *self.run_measured(name, self.rows_for(name, examples, result))) for name in names]

        groups = list(by_backend.values())
        if len(groups) == 1:
            done = run_group(groups[0])
        else:
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="dlngraph-node") as pool:
                done = [item for part in pool.map(run_group, groups) for item in part]
        for name, record, usage in sorted(done, key=lambda item: item[0]):
            result.records[name] = record
            result.usage[name] = usage

    def rows_for(self, name: str, examples: Sequence[Mapping[str, str]], result: RunResult) -> list[Row]:
        """Template variables of each example: the node's inputs plus its parents' outputs
        (a parent these stages do not run is read from the example, as the content-free
        calibration inputs give every parent's value)."""
        node = self.plan.nodes[name]
        given = [*node.inputs, *(p for p in node.parents if p not in result.records)]
        rows: list[Row] = []
        for index, example in enumerate(examples):
            missing = [f for f in given if f not in example]
            if missing:
                raise RuntimeFailure(f"example {index} lacks input field {', '.join(map(repr, missing))}", node=name)
            row = {f: example[f] for f in given}
            row.update({p: result.records[p].outputs[index] for p in node.parents if p in result.records})
            rows.append(row)
        return rows

    def run_measured(self, name: str, rows: list[Row]) -> tuple[ForwardRecord, Usage]:
        backend = self.backends[self.plan.nodes[name].backend]
        before = backend.usage.copy()
        started = time.perf_counter()
        record = self.run_node(name, rows)
        usage = backend.usage - before
        usage.seconds = time.perf_counter() - started
        return record, usage

    def run_node(self, name: str, rows: list[Row]) -> ForwardRecord:
        try:
            return self.layer(name).forward(rows, self.params_of(name), seed=self.seed)
        except RuntimeFailure as exc:
            if exc.node:
                raise
            raise _with_node(exc, name) from exc
        except DlngraphError:
            raise
        except Exception as exc:  # a backend or model crash: say where, keep the cause
            raise RuntimeFailure(f"{type(exc).__name__}: {exc}", node=name) from exc


def _with_node(exc: RuntimeFailure, name: str) -> RuntimeFailure:
    message = str(exc).split("\n", 1)[0].removeprefix("error: ")
    return RuntimeFailure(message, node=name, hint=exc.hint)
