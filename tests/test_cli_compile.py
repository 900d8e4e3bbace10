"""`dlngraph compile`, `schema` and `explain` through the CLI entry point, and the meta-prompt pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlngraph.codes import CODES, lookup, markdown
from dlngraph.errors import SpecError
from dlngraph.compiler.pipeline import compile_unit

from cli_runner import invoke

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_compile_prints_a_summary_of_every_example(spec: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = invoke(capsys, "compile", str(spec))
    assert (code, err) == (0, "")
    assert out.startswith("plan ")
    for section in ("nodes (", "forward (", "backward per iteration", "per iteration:", "fit ("):
        assert section in out


def test_compile_formats_and_output_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = str(ROOT / "specs/dln2-subj.yaml")
    code, out, _ = invoke(capsys, "compile", spec, "--format", "json")
    assert code == 0
    plan = json.loads(out)
    assert [s["nodes"] for s in plan["forward"]] == [["reason"], ["answer"]]
    assert plan["estimate"]["fit"]["requests"] > 0
    code, out, _ = invoke(capsys, "compile", spec, "-f", "dot")
    assert out.startswith('digraph "dln2-subj"') and '"reason" -> "answer";' in out
    code, out, _ = invoke(capsys, "compile", spec, "-f", "mermaid")
    assert out.startswith("flowchart LR") and "n_reason --> n_answer" in out
    target = tmp_path / "plan.json"
    code, out, _ = invoke(capsys, "compile", spec, "-f", "json", "-o", str(target))
    assert (code, out) == (0, "")
    assert json.loads(target.read_text()) == plan


def test_unwritable_output_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = invoke(capsys, "compile", str(SPECS[0]), "-o", str(tmp_path / "new-dir" / "plan.txt"))
    assert (code, out) == (0, "") and (tmp_path / "new-dir" / "plan.txt").is_file()  # a missing folder is made
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    code, out, err = invoke(capsys, "compile", str(SPECS[0]), "-o", str(not_a_folder / "plan.txt"))
    assert code != 0 and out == ""
    assert err.startswith(f"error: cannot write {not_a_folder / 'plan.txt'}") and "Traceback" not in err


def test_load_plan_reads_a_saved_plan_and_refuses_a_stale_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dlngraph import DlngraphError, load_plan

    spec = tmp_path / "spec.yaml"
    spec.write_bytes((ROOT / "specs/wide-dag.yaml").read_bytes().replace(b"data/", str(ROOT / "specs/data").encode() + b"/"))
    saved = tmp_path / "plan.json"
    assert invoke(capsys, "compile", str(spec), "-f", "json", "-o", str(saved))[0] == 0
    assert load_plan(saved).to_json() == saved.read_text()
    spec.write_text(spec.read_text().replace("iterations: 3", "iterations: 5"))
    with pytest.raises(DlngraphError, match="stale"):
        load_plan(saved)


def test_schema_is_the_spec_json_schema(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = invoke(capsys, "schema")
    schema = json.loads(out)
    assert code == 0
    assert {"name", "inputs", "nodes", "outputs", "train"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_explain_by_code_and_name(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = invoke(capsys, "explain", "e301")
    assert code == 0 and out.startswith("E301 (cycle):")
    code, out, _ = invoke(capsys, "explain", "unknown-key")
    assert code == 0 and out.startswith("E101 (unknown-key):")
    code, out, _ = invoke(capsys, "explain", "--all")
    assert len(out.strip().splitlines()) == len(CODES)
    code, _, err = invoke(capsys, "explain", "E999")
    assert code == 1 and "unknown code" in err


def test_codes_have_unique_names_and_docs_list_them_all() -> None:
    assert len({c.name for c in CODES.values()}) == len(CODES)
    assert all(lookup(c.name) is c and c.explanation for c in CODES.values())
    docs = (ROOT / "docs/errors.md").read_text()
    assert docs == markdown(), "regenerate: python -m dlngraph.codes > docs/errors.md"
    for c in CODES.values():
        assert f"## {c.code} {c.name}" in docs


def test_a_broken_builtin_meta_prompt_fails_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import dlngraph.prompts as prompts

    monkeypatch.setattr(prompts, "TEMPLATES", {"proposal.jinja": frozenset({"prompt"})})
    monkeypatch.setattr(prompts, "load", lambda name: "Improve:\n{{ prompt }}\n{% for x in failures %}")
    with pytest.raises(SpecError) as info:
        compile_unit(ROOT / "specs/dln1-mpqa.yaml")
    [d] = info.value.diagnostics
    assert d.code == "E601" and d.file.endswith("proposal.jinja")
    assert "built-in meta-prompt 'proposal.jinja' does not parse" in d.message


def test_a_meta_prompt_reading_an_undeclared_variable_fails_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import dlngraph.prompts as prompts

    monkeypatch.setattr(prompts, "TEMPLATES", {"posterior.jinja": frozenset({"prompt", "input"})})
    monkeypatch.setattr(prompts, "load", lambda name: "{{ prompt }}\n{{ input }}\n{{ answer }}")
    with pytest.raises(SpecError) as info:
        compile_unit(ROOT / "specs/dln1-mpqa.yaml")
    [d] = info.value.diagnostics
    assert (d.code, d.span.line) == ("E601", 3)
    assert "undeclared variable(s) answer" in d.message


def _documented_default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if hasattr(value, "model_dump"):
        return "see below"
    if isinstance(value, dict):  # the default backends
        return "`" + json.dumps({k: v.model_dump(exclude_defaults=True) | {"kind": v.kind} for k, v in value.items()}) + "`"
    return "`" + json.dumps(value) + "`"


def test_spec_docs_list_every_key_with_its_default() -> None:
    from dlngraph import spec

    tables: list[list[tuple[str, str]]] = [[]]
    for line in (ROOT / "docs/spec.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            tables[-1].append((cells[0].strip("`"), cells[1]))
        elif tables[-1]:
            tables.append([])
    models = [
        spec.Spec, spec.TorchBackendSpec, spec.LiteLLMBackendSpec, spec.Deployment, spec.PluginBackendSpec,
        spec.DataSpec, spec.LayerNode, spec.TextOutput, spec.ChoiceOutput, spec.DeepThinkingNode,
        spec.Demonstrations, spec.TrainSpec, spec.TrackingSpec, spec.MLflowSpec,
    ]  # fmt: skip
    documented = [t for t in tables if t]
    for model in models:
        want = [(k, _documented_default(f)) for k, f in model.model_fields.items()]
        assert want in documented, f"docs/spec.md: the table of {model.__name__} is missing or stale"
