"""The shape of the CLI and backend packages: every command is a module-level
function that `register(app)` only adds (importable and callable one by one),
no CLI module imports a private name of another package, and the endpoint
probe does not import the litellm backend (which imports it)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from dlngraph.cli import _COMMANDS

CLI = Path(__file__).resolve().parent.parent / "dlngraph" / "cli"


@pytest.mark.parametrize("name", _COMMANDS)
def test_register_adds_module_level_functions(name: str) -> None:
    module = importlib.import_module(f"dlngraph.cli.{name}")
    app = typer.Typer()
    module.register(app)
    registered = [c.callback for c in app.registered_commands]
    registered += [c.callback for g in app.registered_groups for c in g.typer_instance.registered_commands]
    assert registered, f"{name} registers no command"
    for callback in registered:
        assert callback is getattr(module, callback.__name__), f"{callback.__qualname__} is not module-level"


def test_no_cli_module_imports_a_private_name() -> None:
    found = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("dlngraph.cli"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                found += [f"{path.name}: {node.module}.{name}" for name in private]
    assert found == []


def test_a_command_function_runs_on_its_own(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dlngraph.cli.compile import ErrorFormat, PlanFormat, compile_cmd

    spec = Path(__file__).resolve().parent.parent / "specs" / "dln1-mpqa.yaml"
    compile_cmd(spec, PlanFormat.json, None, False, ErrorFormat.full, False, 20.0)
    assert json.loads(capsys.readouterr().out)["name"] == "dln1-mpqa"


def test_the_probe_does_not_import_the_litellm_backend() -> None:
    code = "import sys, dlngraph.runtime.backends.probe; print('dlngraph.runtime.backends.litellm_backend' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
