"""Nothing overwritten, nothing lost: the output guard of every writer flag
(`compile -o`, `eval --out`, `export -o`, `report -o`, `init --force`) and the
one atomic writer behind them, including a write that fails for real (a file
size limit stands in for a full disk). No model is loaded: each refusal comes
before the first model call."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.files import OutputRefused, append_jsonl, check_output, read_jsonl, write_atomic, write_jsonl

from cli_runner import invoke

ROOT = Path(__file__).resolve().parent.parent

SPEC = {
    "name": "guarded",
    "backends": {"local": {"kind": "torch"}},
    "data": {"dev": "data/dev.jsonl"},
    "inputs": ["input"],
    "nodes": {
        "answer": {
            "prompt": "Positive or negative?",
            "template": "{{ prompt }}\n{{ input }}\nAnswer:",
            "output": {"type": "choice", "choices": ["positive", "negative"]},
        }
    },
    "outputs": {"answer": "target"},
}


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev.jsonl").write_text(json.dumps({"input": "fine", "target": "positive"}) + "\n")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return path


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


# --------------------------------------------------------------------------- the guard


def test_guard_refuses_inputs_under_any_name_even_with_force(spec: Path, tmp_path: Path) -> None:
    data = tmp_path / "data" / "dev.jsonl"
    (tmp_path / "link.yaml").symlink_to(spec)
    os.link(data, tmp_path / "hard.jsonl")
    protected = {"the spec": spec, "data file dev": data}
    for name in (spec, tmp_path / "link.yaml", tmp_path / "hard.jsonl", tmp_path / "data" / ".." / "spec.yaml"):
        with pytest.raises(OutputRefused, match="refusing to write") as err:
            check_output(name, protected=protected, force=True)
        assert err.value.exit_code == 2 and "--force never replaces an input" in str(err.value)


def test_guard_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, kind in ((Path("/dev/full"), "a device"), (tmp_path, "a directory"), (fifo, "a pipe")):
        with pytest.raises(OutputRefused, match=kind):
            check_output(path, force=True)


def test_guard_needs_force_for_an_existing_file(tmp_path: Path) -> None:
    fresh, existing = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    existing.write_text("keep\n")
    assert check_output(fresh) == fresh
    with pytest.raises(OutputRefused, match="already exists") as err:
        check_output(existing)
    assert "--force" in str(err.value)
    assert check_output(existing, force=True) == existing


# --------------------------------------------------------------------------- the writer


def test_atomic_write_replaces_whole_keeps_the_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(target, [{"b": 1, "a": "é"}])
    assert target.read_text(encoding="utf-8") == '{"a": "é", "b": 1}\n'
    target.chmod(0o640)
    write_jsonl(target, [{"a": 2}])
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert read_jsonl(target) == [{"a": 2}]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.jsonl"]


def test_a_torn_last_log_line_is_skipped_when_read(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, [{"iteration": 1}, {"iteration": 2}])
    with log.open("a") as f:
        f.write('{"iteration": 3, "dev')  # a crash in the middle of an append
    assert read_jsonl(log) == [{"iteration": 1}, {"iteration": 2}]


def test_a_failed_write_names_the_path_and_keeps_the_old_file(tmp_path: Path) -> None:
    parent_is_a_file = tmp_path / "file.txt"
    parent_is_a_file.write_text("x")
    with pytest.raises(RuntimeFailure, match=f"cannot write {parent_is_a_file}/out.json"):
        write_atomic(parent_is_a_file / "out.json", "{}")


def test_a_full_disk_is_a_clear_error_with_the_old_file_intact(spec: Path, tmp_path: Path) -> None:
    """A real failed write: the child may write at most 64 bytes per file (RLIMIT_FSIZE,
    EFBIG, as ENOSPC would come from a full disk); the plan is longer than that."""
    out = tmp_path / "plan.txt"
    out.write_text("the previous plan\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    command = [sys.executable, "-m", "dlngraph", "compile", str(spec), "-o", str(out), "--force"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, timeout=120, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot write {out}: File too large") and "Traceback" not in done.stderr
    assert out.read_text() == "the previous plan\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "plan.txt", "spec.yaml"]


# --------------------------------------------------------------------------- the commands


def test_compile_output_refuses_the_spec_its_data_and_devices(spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(spec, tmp_path / "data" / "dev.jsonl")
    for target in (spec, tmp_path / "data" / "dev.jsonl", Path("/dev/full"), tmp_path / "data"):
        code, out, err = invoke(capsys, "compile", str(spec), "-o", str(target), "--force")
        assert code == 2 and out == "", err
        assert err.startswith("error: refusing to write") and "Traceback" not in err
    assert snapshot(*before) == before
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_compile_output_replaces_an_existing_file_only_with_force(spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan.json"
    out.write_text("mine\n")
    code, _, err = invoke(capsys, "compile", str(spec), "-f", "json", "-o", str(out))
    assert code == 2 and "already exists" in err and out.read_text() == "mine\n"
    assert invoke(capsys, "compile", str(spec), "-f", "json", "-o", str(out), "--force")[0] == 0
    assert json.loads(out.read_text())["name"] == "guarded"


def test_eval_out_is_checked_before_any_model_call(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dlngraph.runtime.backends.registry

    def no_backends(*args: object, **kwargs: object) -> None:
        raise AssertionError("a backend was opened before the output was checked")

    monkeypatch.setattr(dlngraph.runtime.backends.registry, "open_backends", no_backends)
    data = tmp_path / "data" / "dev.jsonl"
    checkpoint = tmp_path / "best.yaml"
    checkpoint.write_text("prompts: {answer: Say positive.}\n")
    before = snapshot(spec, data, checkpoint)
    existing = tmp_path / "preds.jsonl"
    existing.write_text("earlier predictions\n")
    cases = [(spec, "--force"), (data, "--force"), (checkpoint, "--force"), (Path("/dev/full"), "--force"),
             (existing, None)]
    for target, force in cases:
        args = ["eval", str(spec), "--checkpoint", str(checkpoint), "--out", str(target)] + ([force] if force else [])
        code, out, err = invoke(capsys, *args)
        assert code == 2 and out == "" and "Traceback" not in err, err
    assert snapshot(*before) == before and existing.read_text() == "earlier predictions\n"


def test_export_refuses_to_write_over_its_inputs(spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "best.yaml"
    checkpoint.write_text("prompts: {answer: Say positive.}\n")
    before = snapshot(spec, checkpoint)
    for target in (spec, checkpoint):
        code, _, err = invoke(capsys, "export", str(spec), "--checkpoint", str(checkpoint), "-o", str(target), "--force")
        assert code == 2 and "refusing to write" in err
    assert snapshot(*before) == before
    fitted = tmp_path / "fitted.yaml"
    assert invoke(capsys, "export", str(spec), "--checkpoint", str(checkpoint), "-o", str(fitted))[0] == 0
    assert yaml.safe_load(fitted.read_text())["nodes"]["answer"]["prompt"] == "Say positive."
    code, _, err = invoke(capsys, "export", str(spec), "--checkpoint", str(checkpoint), "-o", str(fitted))
    assert code == 2 and "already exists" in err


def test_report_out_never_replaces_the_runs_own_files(spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dlngraph.api import compile_spec
    from dlngraph.runtime.rundir import RunDir

    run = tmp_path / "run"
    with RunDir.create(run, compile_spec(spec)) as written:
        written.append(written.metrics, [{"iteration": 0, "dev_acc": 0.5}])
    before = snapshot(run / "plan.json", run / "metrics.jsonl")
    for target in (run / "metrics.jsonl", run / "plan.json"):
        code, _, err = invoke(capsys, "report", str(run), "-o", str(target), "--force")
        assert code == 2 and "refusing to write" in err
    assert snapshot(*before) == before
    assert invoke(capsys, "report", str(run))[0] == 0 and invoke(capsys, "report", str(run))[0] == 0  # its own default
    page = tmp_path / "page.html"
    assert invoke(capsys, "report", str(run), "-o", str(page))[0] == 0
    assert invoke(capsys, "report", str(run), "-o", str(page))[0] == 2


def test_init_force_never_replaces_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "net" / "spec.yaml").mkdir(parents=True)
    code, _, err = invoke(capsys, "init", str(tmp_path / "net"), "--force")
    assert code == 2 and "is a directory" in err and "Traceback" not in err
