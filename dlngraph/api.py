"""The public Python API: compile a spec into an `ExecutionPlan`, load a saved
plan, run and evaluate a network, fit its prompts and export the fitted spec.

`run`, `evaluate` and `fit` open the spec's backends behind the response cache
unless given some (`no_cache`: an in-memory one for this call only), and
`run` / `evaluate` apply the learned parameters of a `checkpoint` written by
`fit` (`runtime.checkpoint`). The spec object is never mutated: learned
prompts live in the run directory.

`compile_spec` is what `dlngraph compile` runs. It is offline: it reads the
spec, its data files and, for a litellm backend that names a `tokenizer`, that
tokenizer from local files, and sends no request, so a spec compiles the same
with or without a server or an API key. Backends have their declared
capabilities (the spec's `capabilities:` list, else the kind's).
`probe_timeout` asks litellm endpoints instead, all within that many seconds.
`capability_resolver` is the general hook: `(backend_name, backend_spec) ->
frozenset[Capability]`; raising KeyError means "unknown kind".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dlngraph.errors import DlngraphError, RuntimeFailure

from dlngraph.compiler.ir import CapabilityResolver
from dlngraph.compiler.pipeline import compile_unit
from dlngraph.compiler.plan import ExecutionPlan

if TYPE_CHECKING:
    from dlngraph.runtime.backends.base import Backend
    from dlngraph.runtime.evaluation import Evaluation
    from dlngraph.runtime.executor import Executor
    from dlngraph.runtime.fit import FitResult
    from dlngraph.runtime.trainer import Events

SpecLike = str | Path | ExecutionPlan


def compile_spec(
    path: str | Path,
    *,
    capability_resolver: CapabilityResolver | None = None,
    probe_timeout: float | None = None,
) -> ExecutionPlan:
    """Check the spec at `path` and build its plan; raises `SpecError` on any mistake.
    With `probe_timeout` (seconds), litellm endpoints the spec points at are asked
    what they support, every request within that time together."""
    # The runtime's hooks for litellm backends (the module imports litellm only when one runs).
    from dlngraph.runtime.backends.litellm_backend import probing_resolver, token_counter

    if capability_resolver is None and probe_timeout is not None:
        capability_resolver = probing_resolver(probe_timeout)
    unit = compile_unit(path, capability_resolver=capability_resolver, token_counter=token_counter)
    assert unit.plan is not None
    return unit.plan


def load_plan(path: str | Path, *, capability_resolver: CapabilityResolver | None = None) -> ExecutionPlan:
    """The plan of a spec YAML, or of a plan JSON written by `dlngraph compile --format json`.

    A plan JSON names its spec (a file beside it) and the spec's SHA-256; the
    plan is recompiled from that spec, and a spec changed since is an error,
    so a stale plan never runs.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        return compile_spec(path, capability_resolver=capability_resolver)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        spec_path = path.parent / saved["spec"]
        digest = saved["spec_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DlngraphError(f"error: {path} is not a plan written by `dlngraph compile --format json`: {exc}") from None
    if not spec_path.is_file() or hashlib.sha256(spec_path.read_bytes()).hexdigest() != digest:
        raise DlngraphError(
            f"error: plan {path} is stale: its spec {spec_path} is missing or has changed; "
            "run `dlngraph compile` again"
        )
    return compile_spec(spec_path, capability_resolver=capability_resolver)


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
    plan = _plan(spec)
    with ExitStack() as stack:
        executor = _executor(plan, stack, checkpoint, prompts, backends, cache_dir=cache_dir, no_cache=no_cache)
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
    """Score the output nodes on `split`, writing the prediction rows to `out` as JSONL;
    `on_batch(done, total)` reports progress.

    `out` is checked before the first model call: never the spec, its data or
    the checkpoint, never a non-regular file, an existing file only with `force`."""
    from dlngraph.runtime.data import read_split
    from dlngraph.runtime.evaluation import evaluate as score
    from dlngraph.runtime.files import check_output, write_jsonl

    plan = _plan(spec)
    if split not in plan.data_paths:
        raise RuntimeFailure(f"the spec names no `data.{split}` file", hint="add it under `data:` in the spec")
    if out is not None:
        out = check_output(out, protected=input_files(plan, checkpoint), force=force)
    examples = read_split(plan, split, limit=limit)
    with ExitStack() as stack:
        executor = _executor(plan, stack, checkpoint, prompts, backends, cache_dir=cache_dir, no_cache=no_cache)
        result = score(executor, examples, split=split, batch_size=batch_size, on_batch=on_batch)
    if out is not None:
        write_jsonl(out, result.predictions)  # atomic: a crash never leaves half a predictions file
    return result


def fit(
    spec: SpecLike,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    seed: int | None = None,
    *,
    iterations: int | None = None,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    mlflow: bool = False,
    backends: Mapping[str, Backend] | None = None,
    events: Events | None = None,
) -> FitResult:
    """Train the spec's prompts into the run directory `out` (default runs/<name>-<time>), or
    continue the run in `resume` from its last checkpoint; returns a `FitResult` (run
    directory, last and best parameters). `mlflow` logs to MLflow even when the spec has
    no `tracking.mlflow`."""
    from dlngraph.runtime.fit import Fit

    plan = _plan(spec)
    options: dict[str, Any] = dict(
        seed=seed, iterations=iterations, cache_dir=cache_dir, no_cache=no_cache, mlflow=mlflow,
        backends=backends, events=events,
    )
    return (Fit.resume(resume, plan, **options) if resume is not None else Fit.start(plan, out, **options)).run()


def export(spec_path: str | Path, checkpoint: str | Path, out: str | Path) -> Path:
    """Write the spec with the checkpoint's learned parameters in place: the nodes'
    `prompt:`, their demonstrations as fixed `demos.examples` and their fitted
    label priors as `calibration_bias`.

    The spec is re-read as plain YAML and only those values are replaced, so
    everything else (data paths, comments aside) stays as written; data paths
    are made absolute when the output lives elsewhere, so it compiles.
    """
    from dlngraph.runtime.checkpoint import load_learned
    from dlngraph.runtime.files import write_yaml

    spec_path, out = Path(spec_path), Path(out)
    learned = load_learned(checkpoint)
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    nodes = data.get("nodes") or {}
    unknown = sorted(set(learned["prompts"]) - set(nodes))
    if unknown:
        raise RuntimeFailure(f"checkpoint {checkpoint} has prompts for unknown node(s) {', '.join(unknown)}")
    for name, prompt in sorted(learned["prompts"].items()):
        nodes[name]["prompt"] = prompt
    for name, shown in sorted(learned["demos"].items()):
        if name in nodes and isinstance(nodes[name].get("demos"), dict):
            nodes[name]["demos"]["examples"] = shown
    for name, prior in sorted(learned["calibration"].items()):
        if name in nodes:
            nodes[name]["calibration_bias"] = prior
    if out.resolve().parent != spec_path.resolve().parent:
        for split, path in (data.get("data") or {}).items():
            data["data"][split] = str((spec_path.resolve().parent / path).resolve())
    return write_yaml(out, data, sort_keys=False)


def input_files(plan: ExecutionPlan, checkpoint: str | Path | None) -> dict[str, Path]:
    """The files a command reads, which no output may replace."""
    files = {"the spec": Path(plan.spec_path), **{f"data file {s}": Path(p) for s, p in plan.data_paths.items()}}
    if checkpoint is not None:
        files["the checkpoint"] = Path(checkpoint)
    return files


def _plan(spec: SpecLike) -> ExecutionPlan:
    return spec if isinstance(spec, ExecutionPlan) else load_plan(spec)


def _executor(
    plan: ExecutionPlan,
    stack: ExitStack,
    checkpoint: str | Path | None,
    prompts: Mapping[str, str] | None,
    backends: Mapping[str, Backend] | None,
    **cache: Any,
) -> Executor:
    """An executor with the checkpoint's parameters, `prompts` overriding its prompts, on
    `backends` or on the plan's own (closed by `stack`), finding Deep-Thinking states in the
    checkpoint's run directory."""
    from dlngraph.runtime.backends.registry import open_backends
    from dlngraph.runtime.checkpoint import load_learned
    from dlngraph.runtime.executor import Executor
    from dlngraph.runtime.rundir import RunDir

    learned = load_learned(checkpoint) if checkpoint is not None else {}
    learned["prompts"] = {**learned.get("prompts", {}), **(prompts or {})}
    if backends is None:
        backends = open_backends(plan, **cache)
        for backend in backends.values():
            stack.callback(backend.close)
    run_dir = RunDir.of_checkpoint(checkpoint).path if checkpoint is not None else None
    return Executor(plan, backends, run_dir=run_dir, **learned)
