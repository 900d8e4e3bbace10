"""The first hour: `dlngraph init`, `dlngraph doctor`, `--version`, shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import dlngraph
from dlngraph.api import compile_spec
from dlngraph.cli import main
from dlngraph.cli.init import Template
from dlngraph.spec import Spec

CLI = [sys.executable, "-m", "dlngraph"]
# The console script installed beside this interpreter; CI does not put the venv on PATH.
SCRIPT = str(Path(sys.executable).with_name("dlngraph"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("template", list(Template))
def test_init_scaffolds_a_valid_spec_and_data(template: Template, tmp_path: Path) -> None:
    target = tmp_path / "net"
    main(["init", str(target), "--template", template.value])
    spec = Spec.model_validate(yaml.safe_load((target / "spec.yaml").read_text(encoding="utf-8")))
    for split, path in spec.data.paths().items():
        rows = _lines(target / path)
        assert len(rows) >= 20, split
        assert all(set(r) == {"input", "target"} for r in rows)
    choices = {c for name in spec.outputs for c in spec.nodes[name].output.choices}
    assert {r["target"] for r in _lines(target / spec.data.train)} <= choices
    plan = compile_spec(target / "spec.yaml")  # every compiler pass, incl. the data checks
    assert plan.name == spec.name and set(plan.data_paths) == {"train", "dev", "test"}


@pytest.mark.model
def test_init_then_fit_in_a_fresh_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first hour: scaffold, then fit with the defaults of a fresh directory (runs/ under it)."""
    monkeypatch.chdir(tmp_path)
    main(["init", "net"])
    spec_path = Path("net/spec.yaml")
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    spec["train"].update(batch_size=2, prompt_proposals=2, dev_size=4)  # tiny: this is about the plumbing
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    main(["fit", str(spec_path), "--iterations", "1", "--cache", str(tmp_path / "cache")])

    (run,) = sorted(Path("runs").iterdir())
    assert run.name.startswith("mpqa-dln1-")
    assert [m["iteration"] for m in _lines(run / "metrics.jsonl")] == [0, 1]
    best = yaml.safe_load((run / "best.yaml").read_text(encoding="utf-8"))
    assert set(best["prompts"]) == {"answer"} and best["prompts"]["answer"].strip()


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", str(tmp_path)])
    (tmp_path / "spec.yaml").write_text("mine\n")
    with pytest.raises(SystemExit) as exc:
        main(["init", str(tmp_path), "--template", "dln2"])
    assert exc.value.code == 1 and "spec.yaml" in capsys.readouterr().err
    assert (tmp_path / "spec.yaml").read_text() == "mine\n"
    main(["init", str(tmp_path), "--template", "dln2", "--force"])
    assert "name: subj-dln2" in (tmp_path / "spec.yaml").read_text()


def test_doctor_reports_environment_and_provider_names_only(tmp_path: Path) -> None:
    env = {**os.environ, "DLNGRAPH_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": "sk-do-not-print-me"}
    env.pop("ANTHROPIC_API_KEY", None)
    proc = subprocess.run([*CLI, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sk-do-not-print-me" not in proc.stdout + proc.stderr
    checks = {(c["section"], c["name"]): c for c in json.loads(proc.stdout)}
    assert checks[("system", "dlngraph")]["value"] == dlngraph.__version__
    assert checks[("torch", "torch")]["status"] == "ok"
    assert checks[("torch", "device (auto)")]["value"] in ("cpu", "cuda")
    assert checks[("model", "embedded model")]["status"] == "ok"
    assert checks[("model", "converted weights")]["value"] == "not yet converted"  # a fresh cache dir
    assert checks[("cache", "location")]["value"].startswith(str(tmp_path / "cache"))
    assert checks[("providers", "litellm providers")]["value"] == "openai (OPENAI_API_KEY)"


def test_doctor_names_the_extra_for_a_missing_optional_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlngraph.cli import doctor

    monkeypatch.setattr(doctor, "_version", lambda dist: None if dist in ("mkdocs-material", "litellm") else "1.0")
    checks = {c.name: c for c in doctor.diagnose() if c.section == "system"}
    assert (checks["mkdocs-material"].status, checks["mkdocs-material"].hint) == ("info", 'pip install "dlngraph[docs]"')
    assert (checks["litellm"].status, checks["litellm"].hint) == ("fail", "pip install litellm")
    assert checks["mlflow"].status == "ok"


def test_version_matches_the_installed_distribution() -> None:
    proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"dlngraph {dlngraph.__version__}"
    assert metadata.version("dlngraph") == dlngraph.__version__


def test_shell_completion_offers_commands_and_templates() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_DLNGRAPH_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        proc = subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=60)
        return proc.stdout.split()

    assert {"init", "doctor", "report"} <= set(complete("dlngraph ", 1))
    assert complete("dlngraph in", 1) == ["init"]
    assert complete("dlngraph init x --template d", 4) == ["dln1", "dln2", "deep-thinking"]
    script = subprocess.run([SCRIPT, "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert "_DLNGRAPH_COMPLETE=complete_bash" in script.stdout
