"""Running and evaluating a compiled network: the API layer over the runtime.

`run(spec, examples)` returns every node's output per example;
`evaluate(spec, split)` scores the output nodes against the split's targets
and can write predictions as JSONL. Both open the spec's backends behind the
response cache unless told otherwise, and apply the learned parameters of a
checkpoint (YAML with a top-level `prompts: {node: prompt}` mapping, and
`demos:` / `calibration:` mappings for layers that learn them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any


from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime.checkpoint import load_yaml
from dlngraph.runtime.evaluation import Evaluation
from dlngraph.runtime.files import check_output, write_jsonl

SpecLike = str | Path | ExecutionPlan


def compile_plan(spec: SpecLike) -> ExecutionPlan:
    if isinstance(spec, ExecutionPlan):
        return spec
    from dlngraph.api import load_plan

    return load_plan(spec)


def open_backends(
    plan: ExecutionPlan, *, cache_dir: str | Path | None = None, no_cache: bool = False
) -> dict[str, Backend]:
    """The backends the plan's nodes (and their proposer) use, each behind the response cache; with
    `no_cache` behind an in-memory one that dedupes within this run only."""
    from dlngraph.runtime.backends.registry import create_backend
    from dlngraph.runtime.cache import Cache, MemoryCache

    cache = MemoryCache() if no_cache else Cache(cache_dir)
    used = sorted({node.backend for node in plan.nodes.values()} | {n.proposer for n in plan.nodes.values() if n.proposer})
    return {name: create_backend(name, plan.spec.backends[name], cache=cache) for name in used}


def load_checkpoint(path: str | Path) -> dict[str, str]:
    """The `prompts` mapping of a checkpoint file."""
    path = Path(path)
    data = load_yaml(path)
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise RuntimeFailure(
            f"checkpoint {path} has no `prompts:` mapping of node names to prompt strings",
            hint="checkpoints are written by `dlngraph fit`",
        )
    return {str(k): v for k, v in prompts.items()}


def _prompts(checkpoint: str | Path | None, prompts: Mapping[str, str] | None) -> dict[str, str]:
    merged = load_checkpoint(checkpoint) if checkpoint is not None else {}
    merged.update(prompts or {})
    return merged


def load_learned(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """A checkpoint's other learned parameters, as `Executor` keywords: `demos`
    ({node: [demonstration]}) and `calibration` ({node: {label: prior}}); none for no checkpoint."""
    data = load_yaml(Path(path)) if path is not None else {}
    return {key: dict((data.get(key) or {}) if isinstance(data, dict) else {}) for key in ("demos", "calibration")}


def _run_dir(checkpoint: str | Path | None) -> Path | None:
    """A checkpoint's directory also holds the run's Deep-Thinking states."""
    return Path(checkpoint).parent if checkpoint is not None else None


def run(
    spec: SpecLike,
    examples: Sequence[Mapping[str, str]],
    *,
    checkpoint: str | Path | None = None,
    prompts: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    backends: Mapping[str, Backend] | None = None,
) -> list[dict[str, str]]:
    """Every node's output for each example (one batched call per node)."""
    from dlngraph.runtime.executor import Executor

    plan = compile_plan(spec)
    with ExitStack() as stack:
        if backends is None:
            backends = open_backends(plan, cache_dir=cache_dir, no_cache=no_cache)
            stack.callback(_close_all, backends)
        executor = Executor(
            plan, backends, _prompts(checkpoint, prompts), run_dir=_run_dir(checkpoint), **load_learned(checkpoint)
        )
        result = executor.run(examples)
    return [result.outputs(i) for i in range(len(examples))]


def evaluate(
    spec: SpecLike,
    split: str = "dev",
    *,
    checkpoint: str | Path | None = None,
    prompts: Mapping[str, str] | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    force: bool = False,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    batch_size: int = 16,
    backends: Mapping[str, Backend] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score the output nodes on `split`; `on_batch(done, total)` reports progress.

    `out` is checked before the first model call: never the spec, its data or
    the checkpoint, never a non-regular file, an existing file only with `force`."""
    from dlngraph.runtime.data import read_jsonl
    from dlngraph.runtime.evaluation import evaluate as score
    from dlngraph.runtime.executor import Executor

    plan = compile_plan(spec)
    path = plan.data_paths.get(split)
    if path is None:
        raise RuntimeFailure(f"the spec names no `data.{split}` file", hint="add it under `data:` in the spec")
    if out is not None:
        out = check_output(out, protected=input_files(plan, checkpoint), force=force)
    examples = read_jsonl(Path(path), [*plan.spec.inputs, *sorted(set(plan.spec.outputs.values()))], limit=limit)
    with ExitStack() as stack:
        if backends is None:
            backends = open_backends(plan, cache_dir=cache_dir, no_cache=no_cache)
            stack.callback(_close_all, backends)
        executor = Executor(
            plan, backends, _prompts(checkpoint, prompts), run_dir=_run_dir(checkpoint), **load_learned(checkpoint)
        )
        result = score(executor, examples, split=split, batch_size=batch_size, on_batch=on_batch)
    if out is not None:
        write_jsonl(out, result.predictions)  # atomic: a crash never leaves half a predictions file
    return result


def input_files(plan: ExecutionPlan, checkpoint: str | Path | None) -> dict[str, Path]:
    """The files a run reads, which no output may replace."""
    files = {"the spec": Path(plan.spec_path), **{f"data file {s}": Path(p) for s, p in plan.data_paths.items()}}
    if checkpoint is not None:
        files["the checkpoint"] = Path(checkpoint)
    return files


def _close_all(backends: Mapping[str, Backend]) -> None:
    for backend in backends.values():
        backend.close()
