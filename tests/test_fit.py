"""`Fit` owns a fit from start to end (scripted backend, no model): `start` and
`resume` lock the run directory and `run` frees it, and a run killed before its
first checkpoint starts again without repeating its metrics line."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from dlngraph.api import compile_spec
from dlngraph.runtime.fit import Fit

from tests.scripted_backend import ScriptedBackend
from tests.test_trainer import write_spec


def lock_is_free(run: Path) -> bool:
    with (run / ".lock").open("a") as handle:  # flock conflicts across open files, even in one process
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def test_a_run_killed_before_its_first_checkpoint_starts_again_once(tmp_path: Path) -> None:
    plan = compile_spec(write_spec(tmp_path))
    fit = Fit.start(plan, tmp_path / "run", backends={"local": ScriptedBackend()}, iterations=1)
    assert not lock_is_free(fit.run_dir.path)
    first = fit.run()
    assert lock_is_free(fit.run_dir.path)
    for checkpoint in fit.run_dir.checkpoint_files():
        checkpoint.unlink()  # as if killed after iteration 0's metrics line, before its checkpoint
    again = Fit.resume(fit.run_dir.path, plan, backends={"local": ScriptedBackend()}, iterations=1).run()
    lines = [json.loads(line) for line in fit.run_dir.metrics.read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [0, 1]
    assert again.best == first.best and again.prompts == first.prompts
