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
from dlngraph.errors import MAX_COLLECTED, MAX_SHOWN, SOURCE_WINDOW, SpecError
from dlngraph.yamlsource import MAX_DEPTH, MAX_SPEC_BYTES, MAX_VALUES

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
    # Two cases may share a message (a field path, say) but not also the code and the place.
    assert len({(e["code"], e["message"], e["line"], e["col"]) for e in EXPECTED.values()}) == len(EXPECTED)


def test_each_code_is_declared_once() -> None:
    import re

    from dlngraph.codes import markdown

    declared = re.findall(r"^## (E\d{3}) ", markdown(), re.MULTILINE)
    assert len(declared) == len(set(declared)) == len(CODES)


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
        "  = help: did you mean `input`? (variables here: demos, input, prompt; inputs are listed under `inputs:`)\n"
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


@pytest.mark.parametrize(("path", "what"), [("/dev/zero", "a device"), (str(BAD / "data"), "a directory")])
def test_a_spec_path_that_is_not_a_file_is_refused_unread(path: str, what: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, path)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0] == f"{path}:1:1: error: the spec path is {what}, not a file: {path}"
    assert "= code: E007 " in err


@pytest.mark.parametrize("size", [100, MAX_SPEC_BYTES + 1])
def test_a_pipe_is_read_up_to_the_size_limit(size: int, tmp_path: Path) -> None:
    import os
    import threading

    from dlngraph.yamlsource import load_source

    pipe = tmp_path / "spec.pipe"
    os.mkfifo(pipe)
    text = "name: piped\n" + "#" * (size - len("name: piped\n") - 1) + "\n"

    def write() -> None:
        with pipe.open("w") as f:
            try:
                f.write(text)
            except BrokenPipeError:  # the reader stops at the limit
                pass

    writer = threading.Thread(target=write)
    writer.start()
    try:
        if size <= MAX_SPEC_BYTES:
            assert load_source(pipe).data == {"name": "piped"}
        else:
            with pytest.raises(SpecError, match="more than the limit"):
                load_source(pipe)
    finally:
        writer.join()


def _assert_bounded(err: str, shown: int) -> None:
    """At most `shown` diagnostics, each source line echoed within its window."""
    assert len([line for line in err.splitlines() if ": error: " in line]) == shown
    echoed = [line.split(" | ", 1)[1] for line in err.splitlines() if " | " in line]
    assert echoed and all(len(text) <= SOURCE_WINDOW + 6 for text in echoed)


# 2,000 nodes on one line, each with one mistake: an unknown key, or a
# variable that names no node (whose did-you-mean looks at all 2,000 names).
MISTAKES = {
    "unknown-key": "n{k}: {{template: '{{{{ prompt }}}} {{{{ input }}}}', output: {{type: text}}, promtp: x{k}}}",
    "undefined-variable": "n{k}: {{template: '{{{{ prompt }}}} {{{{ input }}}} {{{{ m{k} }}}}', output: {{type: text}}}}",
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_one_line_spec_with_thousands_of_mistakes_prints_the_first_few(
    mistake: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nodes = ", ".join(MISTAKES[mistake].format(k=k) for k in range(2000))
    spec = tmp_path / "typos.yaml"
    spec.write_text(f"{{name: typos, inputs: [input], nodes: {{{nodes}}}, outputs: {{n0: target}}}}\n")
    assert spec.stat().st_size > 150_000
    code, _, err = _run(capsys, str(spec))
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0].startswith(f"{spec}:1:")
    _assert_bounded(err, MAX_SHOWN)
    assert err.rstrip().endswith(f"... and {2000 - MAX_SHOWN:,} more errors not shown; fix these and compile again")
    assert len(err) < 20_000
    code, _, concise = _run(capsys, "--error-format", "concise", str(spec))
    assert len(concise.splitlines()) == MAX_SHOWN + 1
    code, _, as_json = _run(capsys, "--error-format", "json", str(spec))
    # tools get the diagnostics a pass builds, without source lines; validation builds the first MAX_COLLECTED
    assert len(json.loads(as_json)) == (MAX_COLLECTED if mistake == "unknown-key" else 2000)


def test_a_flood_of_unknown_keys_is_counted_not_built(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "keys.yaml"
    spec.write_text("name: k\n" + "".join(f"k{i}: 1\n" for i in range(100_000)))
    code, _, err = _run(capsys, str(spec))
    assert code == 2
    _assert_bounded(err, MAX_SHOWN)
    # 100,000 unknown keys and 3 missing ones, of which MAX_SHOWN are shown
    assert err.rstrip().endswith(f"... and {100_003 - MAX_SHOWN:,} more errors not shown; fix these and compile again")


def test_a_long_message_is_clipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = "k" * 1_000  # YAML's longest plain key is 1,024 characters
    spec = tmp_path / "long-key.yaml"
    spec.write_text(f"name: long\n{key}: 1\n")
    code, _, err = _run(capsys, str(spec))
    assert code == 2 and "E101" in err and len(err) < 2_000
    [headline] = [line for line in err.splitlines() if "unknown key" in line]
    assert headline.endswith("...") and len(headline) < 500


def test_a_flow_list_of_millions_stops_at_the_value_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "flow.yaml"
    spec.write_text(
        "name: flow\ninputs: [" + ", ".join(["x"] * 5_000_000) + "]\n"
        "nodes: {a: {template: '{{ prompt }}', output: {type: text}}}\noutputs: {a: target}\n"
    )
    code, _, err = _run(capsys, str(spec))
    assert code == 2
    # the item that makes MAX_VALUES + 1; before the items: the top mapping, `name`, `flow`, `inputs`, the list
    first = err.splitlines()[0]
    assert first.startswith(f"{spec}:2:{len('inputs: [') + 3 * (MAX_VALUES - 5) + 1}: error: the spec holds more than")
    assert "= code: E009 " in err
    _assert_bounded(err, 1)


def test_nesting_at_the_depth_limit_is_accepted(tmp_path: Path) -> None:
    from dlngraph.yamlsource import load_source

    spec = tmp_path / "deep.yaml"
    spec.write_text("name: deep\nx: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert load_source(spec).data["x"] is not None
    spec.write_text("name: deep\nx: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    with pytest.raises(SpecError, match="nest more than"):
        load_source(spec)


def test_aliases_within_the_limits_are_expanded_as_yaml_says(tmp_path: Path) -> None:
    from dlngraph.yamlsource import load_source

    spec = tmp_path / "shared.yaml"
    spec.write_text("name: s\nt: &t '{{ prompt }}'\nl: &l [*t, *t, *t]\nm: [*l, *l]\n")
    assert load_source(spec).data["m"] == [["{{ prompt }}"] * 3] * 2


def test_installed_command_exits_2_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dlngraph", "compile", str(BAD / "cycle.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"{BAD / 'cycle.yaml'}:8:32: error: node 'critique': cycle: ")
    assert "Traceback" not in done.stderr and done.stdout == ""


def _spec_reading(tmp_path: Path, test_path: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: s\ndata: {{train: {BAD / 'data' / 'tiny.jsonl'}, test: {test_path}}}\ninputs: [input]\n"
        "nodes: {a: {template: '{{ prompt }} {{ input }}', output: {type: text}}}\noutputs: {a: target}\n"
    )
    return spec


def test_a_data_file_that_is_not_data_is_named_never_shown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    secret = tmp_path / "credentials"
    secret.write_text('{"input": "x", "target": "y"}\naws_secret_access_key = SECRET-1234\n')
    code, _, err = _run(capsys, str(_spec_reading(tmp_path, secret)))
    assert code == 2 and err.splitlines()[0].startswith(f"{secret}:2:1: error: data file is not JSONL of objects")
    assert "SECRET" not in err and "aws" not in err


def test_a_data_file_over_the_size_limit_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dlngraph.compiler.data_checks import MAX_DATA_BYTES

    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as f:  # sparse: no disk is used, and reading it would take seconds
        f.truncate(MAX_DATA_BYTES + 1)
    code, _, err = _run(capsys, str(_spec_reading(tmp_path, huge)))
    assert code == 2 and f"is {MAX_DATA_BYTES + 1:,} bytes, more than the limit" in err and "= code: E506 " in err


def test_the_runtime_reader_names_file_and_line_of_bad_data(tmp_path: Path) -> None:
    from dlngraph.errors import RuntimeFailure
    from dlngraph.runtime.data import read_jsonl

    with pytest.raises(RuntimeFailure, match=r"latin1.jsonl:2: byte 0xe9 is not UTF-8"):
        read_jsonl(BAD / "data" / "latin1.jsonl", ["input"])
    with pytest.raises(RuntimeFailure, match="is a directory"):
        read_jsonl(BAD / "data", ["input"])
    with pytest.raises(RuntimeFailure, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl", ["input"])
