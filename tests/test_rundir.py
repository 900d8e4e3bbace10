"""The run directory: one class names its files (the trainer writes through it,
the report reads through it), and a writer's lock keeps a second fit or resume
of the same directory out, tested with two real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlngraph.api import compile_spec
from dlngraph.cli import main
from dlngraph.errors import RuntimeFailure
from dlngraph.report import load_run
from dlngraph.runtime.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "dln1-mpqa.yaml"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    with RunDir.create(tmp_path / "run", compile_spec(SPEC)) as run:
        run.append(run.metrics, [{"iteration": 0, "dev_acc": 0.5}])
    return run.path


@pytest.fixture
def holder(run_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that opened the run directory for resuming and keeps it."""
    code = textwrap.dedent(f"""
        import sys, time
        from dlngraph.runtime.rundir import RunDir
        run = RunDir.open({str(run_dir)!r})
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    yield process
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=30)


def test_a_second_resume_is_refused_naming_the_holders_pid(
    run_dir: Path, holder: subprocess.Popen[str], capsys: pytest.CaptureFixture
) -> None:
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", str(SPEC), "--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert f"run directory {run_dir} is in use by another dlngraph process (pid {holder.pid})" in err
    assert "Traceback" not in err
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # the refused fit wrote nothing


def test_the_lock_goes_with_its_process(run_dir: Path, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(RuntimeFailure, match=f"pid {holder.pid}"):
        RunDir.open(run_dir)
    holder.kill()  # no clean-up runs: the kernel drops a dead process's flock
    holder.wait(timeout=30)
    with RunDir.open(run_dir) as run:
        assert run.lock_file.read_text().strip() == str(os.getpid())


def test_create_refuses_a_used_directory_but_not_its_own_lock_file(run_dir: Path, tmp_path: Path) -> None:
    plan = compile_spec(SPEC)
    with pytest.raises(RuntimeFailure, match="not empty"):
        RunDir.create(run_dir, plan)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(RuntimeFailure, match="is not a directory"):
        RunDir.create(a_file, plan)
    only_a_lock = tmp_path / "fresh"
    only_a_lock.mkdir()
    (only_a_lock / ".lock").write_text("")  # left by a create that failed
    RunDir.create(only_a_lock, plan).close()


def test_the_report_reads_the_files_the_writer_names(run_dir: Path) -> None:
    with RunDir.open(run_dir) as run:
        run.save_checkpoint({"iteration": 1, "prompts": {"sentiment": "p"}})
        run.save_best({"iteration": 1, "prompts": {"sentiment": "p"}})
        run.write_predictions("best", [{"index": 1, "correct": True}, {"index": 0, "correct": False}])
    record = load_run(run_dir)
    assert record.name == "dln1-mpqa"
    assert record.spec_text == SPEC.read_text()
    assert [c["iteration"] for c in record.checkpoints] == [1]
    assert record.best["prompts"] == {"sentiment": "p"}
    assert [r["index"] for r in record.predictions["best"]] == [0, 1] and record.predictions["initial"] == []


def test_writers_in_one_process_share_the_lock_until_the_last_closes(run_dir: Path) -> None:
    first = RunDir.open(run_dir)
    second = RunDir.open(run_dir)  # this process resuming a run it still holds
    first.close()
    code = f"from dlngraph.runtime.rundir import RunDir; RunDir.open({str(run_dir)!r})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode == 1 and f"pid {os.getpid()}" in other.stderr  # still held by `second`
    second.close()
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_a_checkpoint_names_its_run_directory(run_dir: Path) -> None:
    run = RunDir(run_dir)
    assert RunDir.of_checkpoint(run.checkpoint_path(3)).path == run.path
    assert RunDir.of_checkpoint(run.best).path == run.path
    assert RunDir.of_checkpoint(run_dir.parent / "elsewhere.yaml").path == run_dir.parent


def test_resuming_with_a_changed_spec_is_refused_and_frees_the_lock(run_dir: Path, tmp_path: Path) -> None:
    import fcntl

    from dlngraph.runtime.fit import Fit

    import yaml

    spec = yaml.safe_load(SPEC.read_text())
    spec["data"] = {split: str(SPEC.parent / path) for split, path in spec["data"].items()}
    spec["train"]["seed"] = 99  # any edit changes the spec's hash
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(RuntimeFailure, match="has changed since run"):
        Fit.resume(run_dir, compile_spec(changed))
    with (run_dir / ".lock").open("a") as handle:  # flock conflicts across open files, even in one process
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
