"""Reading a run directory written by `dlngraph fit` into plain records.

The trainer's contract: spec.yaml, plan.json, metrics.jsonl, checkpoints/,
best.yaml, posteriors.jsonl, predictions/dev-{initial,best}.jsonl. Any of the
optional files may be missing (an interrupted run); the report then leaves the
matching section out instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlngraph.errors import RuntimeFailure


@dataclass(frozen=True)
class RunDir:
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


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load_run(path: str | Path) -> RunDir:
    """Read RUN_DIR; plan.json and metrics.jsonl are required, the rest optional."""
    root = Path(path)
    plan_path, metrics_path = root / "plan.json", root / "metrics.jsonl"
    for required in (plan_path, metrics_path):
        if not required.is_file():
            raise RuntimeFailure(
                f"{root} is not a run directory: {required.name} is missing",
                hint="pass the directory `dlngraph fit` wrote, e.g. runs/<spec-name>-<timestamp>",
            )
    checkpoints = [_yaml(p) for p in sorted((root / "checkpoints").glob("iter-*.yaml"))]
    spec_path = root / "spec.yaml"
    return RunDir(
        path=root,
        spec_text=spec_path.read_text(encoding="utf-8") if spec_path.is_file() else "",
        plan=json.loads(plan_path.read_text(encoding="utf-8")),
        metrics=sorted(_jsonl(metrics_path), key=lambda m: m["iteration"]),
        checkpoints=sorted(checkpoints, key=lambda c: c.get("iteration", 0)),
        best=_yaml(root / "best.yaml"),
        posteriors=_jsonl(root / "posteriors.jsonl"),
        predictions={
            which: sorted(_jsonl(root / "predictions" / f"dev-{which}.jsonl"), key=lambda r: r["index"])
            for which in ("initial", "best")
        },
    )
