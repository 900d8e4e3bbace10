"""The run directory `dlngraph fit` writes and `dlngraph report` reads: the one
place that names its files.

    spec.yaml, plan.json, metrics.jsonl, checkpoints/iter-NNNN.yaml, best.yaml,
    posteriors.jsonl, predictions/dev-{initial,best}.jsonl, curve.png,
    deep_thinking/<node>.safetensors, report.html, .lock

Every file is written through `runtime.files` (atomic and fsynced; JSONL logs
appended and fsynced line by line). A resumed run first drops the lines of
iterations after its last checkpoint (a run killed between writing metrics and
its checkpoint repeats that iteration), so every line appears exactly once.

A writer (`create`, `open`) holds an exclusive `flock` on `.lock`, which names
its pid, until `close` (or its process ends): a fit or resume of the same
directory in another process stops with an error naming the holder instead of
interleaving its lines with the first one's. Writers in one process share the
lock (a program that resumes a run it created itself, before closing it).
Readers (`RunDir(path)`) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.checkpoint import read_yaml
from dlngraph.runtime.files import append_jsonl, read_jsonl, write_atomic, write_jsonl, write_yaml

PREDICTION_SETS = ("initial", "best")

# This process's run-directory locks: lock file -> (its open handle, how many RunDirs hold it).
_HELD: dict[Path, tuple[IO[str], int]] = {}
_HELD_GUARD = threading.Lock()


def default_path(name: str, root: Path = Path("runs")) -> Path:
    return root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # ------------------------------------------------------------ file names
        self.spec = self.path / "spec.yaml"
        self.plan = self.path / "plan.json"
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.posteriors = self.path / "posteriors.jsonl"
        self.best = self.path / "best.yaml"
        self.curve = self.path / "curve.png"
        self.report = self.path / "report.html"
        self.lock_file = self.path / ".lock"
        self._locked: Path | None = None  # the key in _HELD while this RunDir holds the lock

    def predictions(self, which: str) -> Path:
        return self.path / "predictions" / f"dev-{which}.jsonl"

    def deep_thinking_state(self, node: str) -> Path:
        return self.path / "deep_thinking" / f"{node}.safetensors"

    def checkpoint_path(self, iteration: int) -> Path:
        return self.checkpoints / f"iter-{iteration:04d}.yaml"

    def checkpoint_files(self) -> list[Path]:
        return sorted(self.checkpoints.glob("iter-*.yaml"))

    def own_files(self) -> dict[str, Path]:
        """The files an output written elsewhere (`report -o`) must never replace."""
        return {"the run's spec": self.spec, "the run's plan": self.plan, "the run's metrics": self.metrics,
                "the run's best prompts": self.best}

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunDir":
        """The run directory a checkpoint belongs to (best.yaml's, or checkpoints/iter-NNNN.yaml's):
        it also holds the run's Deep-Thinking states."""
        folder = Path(checkpoint).parent
        above = cls(folder.parent)
        return above if above.checkpoints == folder else cls(folder)

    # ------------------------------------------------------------ opening for writing

    @classmethod
    def create(cls, path: Path, plan: ExecutionPlan) -> "RunDir":
        """A new run directory holding the spec (as loaded) and its plan, locked."""
        run = cls(path)
        run._refuse_if_used()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create run directory {path}: {exc.strerror}") from None
        run.lock()
        try:
            run._refuse_if_used()  # another process may have filled it between the check and the lock
            write_atomic(run.spec, Path(plan.spec_path).read_text(encoding="utf-8"))
            write_atomic(run.plan, plan.to_json())
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run directory, locked for resuming."""
        run = cls(path)
        if not run.plan.is_file():
            raise RuntimeFailure(f"{path} is not a run directory (no plan.json)", hint="pass the directory `fit` wrote")
        run.lock()
        return run

    def _refuse_if_used(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RuntimeFailure(f"{self.path} is not a directory", hint="pass --out a new or empty directory")
        if self.path.exists() and any(p.name != self.lock_file.name for p in self.path.iterdir()):
            raise RuntimeFailure(
                f"{self.path} already exists and is not empty",
                hint="pass another --out, or --resume it to continue that run",
            )

    def lock(self) -> None:
        """Take the writer's lock, or fail naming the process that holds it."""
        if self._locked is not None:
            return
        key = self.lock_file.resolve()
        with _HELD_GUARD:
            if key in _HELD:
                handle, holders = _HELD[key]
                _HELD[key] = (handle, holders + 1)
                self._locked = key
                return
            handle = self.lock_file.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read(64).strip() or "unknown"
                handle.close()
                raise RuntimeFailure(
                    f"run directory {self.path} is in use by another dlngraph process (pid {holder})",
                    hint="wait for that fit to finish or stop it; two fits on one run directory would "
                    "write the same checkpoints and logs",
                ) from None
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _HELD[key] = (handle, 1)
            self._locked = key

    def close(self) -> None:
        """Release the writer's lock (the lock file stays; only the lock counts)."""
        if self._locked is None:
            return
        with _HELD_GUARD:
            handle, holders = _HELD[self._locked]
            if holders == 1:
                handle.close()
                del _HELD[self._locked]
            else:
                _HELD[self._locked] = (handle, holders - 1)
        self._locked = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        write_yaml(self.checkpoint_path(state["iteration"]), state)

    def last_checkpoint(self) -> dict[str, Any] | None:
        found = self.checkpoint_files()
        return read_yaml(found[-1]) if found else None

    def save_best(self, best: dict[str, Any]) -> None:
        write_yaml(self.best, best)

    # ------------------------------------------------------------ JSONL logs

    def append(self, path: Path, records: Iterable[dict[str, Any]]) -> None:
        append_jsonl(path, records)

    def read(self, path: Path) -> list[dict[str, Any]]:
        return read_jsonl(path)

    def truncate_after(self, iteration: int) -> None:
        """Drop log lines of iterations after `iteration` (and a torn last line)."""
        for path in (self.metrics, self.posteriors):
            if path.is_file():
                write_jsonl(path, [r for r in read_jsonl(path) if r["iteration"] <= iteration])

    def write_predictions(self, which: str, rows: list[dict[str, Any]]) -> None:
        write_jsonl(self.predictions(which), rows)

    # ------------------------------------------------------------ reading

    def saved_plan(self) -> dict[str, Any]:
        return json.loads(self.plan.read_text(encoding="utf-8"))

    def read_mapping(self, path: Path) -> dict[str, Any]:
        """A YAML mapping the run wrote, or {} when the file is missing (an interrupted run)."""
        return read_yaml(path) if path.is_file() else {}
