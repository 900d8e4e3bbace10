"""The run directory `dlngraph fit` writes (the contract `dlngraph report` reads):

    spec.yaml, plan.json, metrics.jsonl, checkpoints/iter-NNNN.yaml, best.yaml,
    posteriors.jsonl, predictions/dev-{initial,best}.jsonl, curve.png,
    deep_thinking/<node>.safetensors

JSONL files are appended line by line; a resumed run first drops the lines of
iterations after its last checkpoint (a run killed between writing metrics and
its checkpoint repeats that iteration), so every line appears exactly once.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.checkpoint import read_yaml, write_yaml


def default_path(name: str, root: Path = Path("runs")) -> Path:
    return root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def posteriors(self) -> Path:
        return self.path / "posteriors.jsonl"

    @property
    def best(self) -> Path:
        return self.path / "best.yaml"

    @property
    def curve(self) -> Path:
        return self.path / "curve.png"

    def predictions(self, which: str) -> Path:
        return self.path / "predictions" / f"dev-{which}.jsonl"

    @classmethod
    def create(cls, path: Path, plan: ExecutionPlan) -> "RunDir":
        """A new run directory holding the spec (as loaded) and its plan."""
        if path.exists() and any(path.iterdir()):
            raise RuntimeFailure(
                f"{path} already exists and is not empty",
                hint="pass another --out, or --resume it to continue that run",
            )
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.spec_path, path / "spec.yaml")
        (path / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        run = cls(path)
        if not (run.path / "plan.json").is_file():
            raise RuntimeFailure(f"{path} is not a run directory (no plan.json)", hint="pass the directory `fit` wrote")
        return run

    def saved_plan(self) -> dict[str, Any]:
        return json.loads((self.path / "plan.json").read_text(encoding="utf-8"))

    # ------------------------------------------------------------ checkpoints

    def checkpoint_path(self, iteration: int) -> Path:
        return self.checkpoints / f"iter-{iteration:04d}.yaml"

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        write_yaml(self.checkpoint_path(state["iteration"]), state)

    def last_checkpoint(self) -> dict[str, Any] | None:
        found = sorted(self.checkpoints.glob("iter-*.yaml"))
        return read_yaml(found[-1]) if found else None

    def save_best(self, best: dict[str, Any]) -> None:
        write_yaml(self.best, best)

    # ------------------------------------------------------------ JSONL logs

    def append(self, path: Path, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        if lines:
            with path.open("a", encoding="utf-8") as f:
                f.write(lines)

    def read(self, path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, iteration: int) -> None:
        """Drop log lines of iterations after `iteration` (and a torn last line)."""
        for path in (self.metrics, self.posteriors):
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record["iteration"] <= iteration:
                    kept.append(line + "\n")
            path.write_text("".join(kept), encoding="utf-8")

    def write_predictions(self, which: str, rows: list[dict[str, Any]]) -> None:
        path = self.predictions(which)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
