"""The bad-spec corpus: every broken spec exits 2 with its expected first diagnostic.

tests/specs/bad/expected.yaml names, per file, the position, code, message,
node (and optionally a hint substring) of the first diagnostic. Each file runs
through the real CLI entry point (`dlngraph.cli.main`), in-process; one runs
as a subprocess to check the exit status and stderr of the installed command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlngraph.cli import main
from dlngraph.codes import CODES
from dlngraph.errors import SpecError
from dlngraph.yamlsource import MAX_SPEC_BYTES

BAD = Path(__file__).resolve().parent / "specs" / "bad"
EXPECTED: dict[str, dict] = yaml.safe_load((BAD / "expected.yaml").read_text())


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["compile", *args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_corpus_is_complete_and_each_case_distinct() -> None:
    files = sorted(p.name for p in BAD.glob("*.yaml") if p.name != "expected.yaml")
    assert files == sorted(EXPECTED)
    assert len(files) >= 30
    assert {e["code"] for e in EXPECTED.values()} <= set(CODES)
    assert len({e["message"] for e in EXPECTED.values()}) == len(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_spec_reports_its_mistake(name: str, capsys: pytest.CaptureFixture) -> None:
    want = EXPECTED[name]
    path = BAD / name
    code, out, err = _run(capsys, str(path))
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    file = str((BAD / want["file"]).resolve()) if "file" in want else str(path)
    where = f"node '{want['node']}': " if want["node"] is not None else ""
    first = err.splitlines()[0]
    assert first.startswith(f"{file}:{want['line']}:{want['col']}: error: {where}"), first
    assert want["message"] in first
    helps = [line for line in err.splitlines() if line.strip().startswith("= help: ")]
    assert helps, err
    if "help" in want:
        assert want["help"] in helps[0]
    assert f"= code: {want['code']} " in err


def test_json_error_format_is_machine_readable(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "--error-format", "json", str(BAD / "cycle.yaml"))
    assert code == 2
    [diagnostic] = json.loads(err)
    assert diagnostic["code"] == "E301"
    assert diagnostic["span"]["line"] == 8 and diagnostic["node"] == "critique"


def test_concise_error_format_is_one_line_per_diagnostic(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "--error-format", "concise", str(BAD / "missing-litellm-model.yaml"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"{BAD / 'missing-litellm-model.yaml'}:3:3: error: missing required key 'model' in backends.api [E102]"
    ]


def test_full_rendering_snapshot(capsys: pytest.CaptureFixture) -> None:
    _, _, err = _run(capsys, str(BAD / "undefined-variable.yaml"))
    assert err == (
        f"{BAD / 'undefined-variable.yaml'}:7:10: error: node 'answer': "
        "template variable `inptu` in `template` names no input or node\n"
        "  |\n"
        "7 |       {{ inptu }}\n"
        "  |          ^^^^^ undefined-variable\n"
        "  = help: did you mean `input`? (variables here: input, prompt; inputs are listed under `inputs:`)\n"
        "  = code: E202 (undefined-variable)\n"
    )


def test_all_errors_of_a_pass_are_reported_sorted(tmp_path: Path) -> None:
    spec = tmp_path / "many.yaml"
    spec.write_text(
        "name: many\ninputs: [input]\nnodes:\n"
        "  a: {template: '{{ prompt }} {{ inptu }}', output: {type: text}, backend: nope}\n"
        "  b: {template: '{{ prompt }} {{ a }} {{ zz }}', output: {type: text}}\n"
        "outputs: {b: target}\n"
    )
    from dlngraph.api import compile_spec

    with pytest.raises(SpecError) as info:
        compile_spec(spec)
    got = [(d.span.line, d.code) for d in info.value.diagnostics]
    assert got == sorted(got) == [(4, "E202"), (4, "E203"), (5, "E202")]


def test_huge_spec_is_rejected_before_parsing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "huge.yaml"
    filler = "# " + "x" * 1022 + "\n"
    spec.write_text("name: huge\n" + filler * (MAX_SPEC_BYTES // len(filler) + 1))
    code, _, err = _run(capsys, str(spec))
    assert code == 2
    assert err.splitlines()[0].startswith(f"{spec}:1:1: error: spec file is ")
    assert "more than the limit" in err and "E003" in err


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and "E007" in err and "spec file not found" in err


def test_installed_command_exits_2_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dlngraph", "compile", str(BAD / "cycle.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"{BAD / 'cycle.yaml'}:8:32: error: node 'critique': cycle: ")
    assert "Traceback" not in done.stderr and done.stdout == ""
