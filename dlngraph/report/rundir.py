"""A run directory written by `dlngraph fit`, read into plain records for the report.

The file names are `runtime.rundir.RunDir`'s (the trainer writes through the
same class). plan.json and metrics.jsonl are required; any other file may be
missing (an interrupted run), and the report then leaves the matching section
out instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.rundir import PREDICTION_SETS, RunDir


@dataclass(frozen=True)
class RunRecord:
    path: Path
    spec_text: str
    plan: dict[str, Any]
    metrics: list[dict[str, Any]]  # sorted by iteration
    checkpoints: list[dict[str, Any]]  # sorted by iteration
    best: dict[str, Any]
    posteriors: list[dict[str, Any]]
    predictions: dict[str, list[dict[str, Any]]]  # "initial" | "best" -> rows sorted by index

    @property
    def name(self) -> str:
        return str(self.plan.get("name") or self.path.name)


def load_run(path: str | Path) -> RunRecord:
    """Read RUN_DIR; plan.json and metrics.jsonl are required, the rest optional."""
    run = RunDir(path)
    for required in (run.plan, run.metrics):
        if not required.is_file():
            raise RuntimeFailure(
                f"{run.path} is not a run directory: {required.name} is missing",
                hint="pass the directory `dlngraph fit` wrote, e.g. runs/<spec-name>-<timestamp>",
            )
    checkpoints = [run.read_mapping(p) for p in run.checkpoint_files()]
    return RunRecord(
        path=run.path,
        spec_text=run.spec.read_text(encoding="utf-8") if run.spec.is_file() else "",
        plan=run.saved_plan(),
        metrics=sorted(run.read(run.metrics), key=lambda m: m["iteration"]),
        checkpoints=sorted(checkpoints, key=lambda c: c.get("iteration", 0)),
        best=run.read_mapping(run.best),
        posteriors=run.read(run.posteriors),
        predictions={
            which: sorted(run.read(run.predictions(which)), key=lambda r: r["index"]) for which in PREDICTION_SETS
        },
    )
