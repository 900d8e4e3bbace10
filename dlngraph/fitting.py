"""Training a network's prompts: the API layer over the runtime's trainer.

`fit(spec_path)` compiles the spec, opens its backends (behind the response
cache unless told otherwise), writes a run directory and trains; `fit(...,
resume=RUN_DIR)` continues a stopped run from its last checkpoint. `export`
writes the spec with learned prompts filled in. The spec object is never
mutated: learned prompts live in the run directory.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.errors import RuntimeFailure

log = logging.getLogger(__name__)


def fit(
    spec_path: str | Path,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    seed: int | None = None,
    *,
    iterations: int | None = None,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    mlflow: bool = False,
    plan: ExecutionPlan | None = None,
    backends: Any = None,
    events: Any = None,
):  # -> FitResult
    """Train the spec's prompts; returns a `FitResult` (run dir, last and best prompts).
    `mlflow` logs to MLflow even when the spec has no `tracking.mlflow`."""
    from dlngraph.api import compile_spec
    from dlngraph.runner import open_backends
    from dlngraph.runtime.rundir import RunDir, default_path
    from dlngraph.runtime.tracking import make_tracker, spec_params
    from dlngraph.runtime.fit import Fit

    plan = plan or compile_spec(spec_path)
    if resume is not None:
        run = RunDir.open(Path(resume))
        saved = run.saved_plan().get("spec_sha256")
        if saved and plan.spec_sha256 and saved != plan.spec_sha256:
            run.close()
            raise RuntimeFailure(
                f"the spec {spec_path} has changed since run {resume} started",
                hint="resume with the spec the run was started with (a copy is in the run directory as spec.yaml)",
            )
    else:
        run = RunDir.create(Path(out) if out is not None else default_path(plan.name), plan)
    tracker = make_tracker(plan.spec, mlflow=mlflow, run_name=run.path.name)
    with ExitStack() as stack:
        stack.callback(run.close)  # the run directory's lock: the next fit or resume may start
        if backends is None:
            backends = open_backends(plan, cache_dir=cache_dir, no_cache=no_cache)
            stack.callback(lambda: [b.close() for b in backends.values()])
        trainer = Fit(plan, backends, run, seed=seed, iterations=iterations, events=events, tracker=tracker)
        tracker.start({**spec_params(plan.spec), "seed": str(trainer.seed)})
        status = "FAILED"
        try:
            result = trainer.run_fit(resume=resume is not None)
            status = "FINISHED"
            tracker.log_artifacts(run.path)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end(status)
    return result


def export(spec_path: str | Path, checkpoint: str | Path, out: str | Path) -> Path:
    """Write the spec with the checkpoint's learned parameters in place: the nodes'
    `prompt:`, their demonstrations as fixed `demos.examples` and their fitted
    label priors as `calibration_bias`.

    The spec is re-read as plain YAML and only those values are replaced, so
    everything else (data paths, comments aside) stays as written; data paths
    are made absolute when the output lives elsewhere, so it compiles.
    """
    from dlngraph.runner import load_checkpoint, load_learned
    from dlngraph.runtime.files import write_yaml

    spec_path, out = Path(spec_path), Path(out)
    prompts = load_checkpoint(checkpoint)
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    nodes = data.get("nodes") or {}
    unknown = sorted(set(prompts) - set(nodes))
    if unknown:
        raise RuntimeFailure(f"checkpoint {checkpoint} has prompts for unknown node(s) {', '.join(unknown)}")
    for name, prompt in sorted(prompts.items()):
        nodes[name]["prompt"] = prompt
    learned = load_learned(checkpoint)
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
