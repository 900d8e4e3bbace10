"""What the installed command prints: results on stdout, and only what was asked for on stderr.

Each test runs `python -m dlngraph` in a subprocess, so libraries are imported
and configured as on a user's machine (a fresh process, an empty user cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "specs" / "bad"


def _dlngraph(*args: str, cache: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    for name in ("DLNGRAPH_CACHE_DIR", "HF_HOME", "LITELLM_LOG", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "dlngraph", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def _litellm_spec(root: Path, api_base: str) -> Path:
    spec = {
        "name": "quiet",
        "backends": {
            "api": {"kind": "litellm", "model": "openai/fake", "api_base": api_base,
                    "capabilities": ["generate", "top_logprobs"], "backoff": 0.01},
        },
        "inputs": ["input"],
        "nodes": {
            "answer": {
                "prompt": "Answer yes or no.",
                "template": "{{ prompt }}\n{{ input }}\nAnswer:",
                "output": {"type": "choice", "choices": [" yes", " no"]},
            }
        },
        "outputs": {"answer": "target"},
    }  # fmt: skip
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("verbose", [[], ["-vv"]])
def test_run_json_stdout_is_only_json(verbose: list[str], fake: FakeOpenAI, tmp_path: Path) -> None:
    spec = _litellm_spec(tmp_path, fake.api_base)
    done = _dlngraph(*verbose, "run", str(spec), "--input", '{"input": "is it?"}', "--json", "--no-cache",
                     cache=tmp_path / "cache")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is the result
    assert [row["outputs"]["answer"] for row in rows] == [" yes"]
    assert fake.requests, "the backend was called"
    if verbose:  # the libraries' debug output went to stderr
        assert "DEBUG" in done.stderr
    else:
        assert done.stderr == ""


@pytest.mark.model
def test_first_use_model_conversion_prints_nothing_before_the_error(tmp_path: Path) -> None:
    """With an empty user cache, compile converts the embedded model to count tokens: silently."""
    cache = tmp_path / "cache"
    done = _dlngraph("compile", str(BAD / "multi-token-choice.yaml"), cache=cache)
    assert done.returncode == 2
    assert done.stdout == ""
    first = done.stderr.splitlines()[0]
    assert first.startswith(f"{BAD / 'multi-token-choice.yaml'}:14:38: error: "), done.stderr[:2000]
    assert "Traceback" not in done.stderr and "%|" not in done.stderr
    converted = list((cache / "dlngraph" / "models").glob("*/config.json"))
    assert converted, "the conversion ran in this fresh cache"


@pytest.mark.model
def test_a_run_on_the_embedded_model_prints_its_result_and_nothing_else(tmp_path: Path) -> None:
    done = _dlngraph("run", str(ROOT / "specs" / "dln1-mpqa.yaml"), "--json", "--no-cache",
                     "--input", json.dumps({"input": "a wonderful, moving film\nOptions:\n- negative\n- positive"}),
                     cache=tmp_path / "cache")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["outputs"]["answer"] in ("negative", "positive")
    assert done.stderr == ""  # no library warning, log line or progress bar without -v


_EMIT = """
import logging, warnings
from dlngraph.cli import verbosity
verbosity.configure({verbose})
warnings.warn("a dependency's deprecation", FutureWarning)
logging.getLogger("transformers.modeling_utils").warning("a library's warning")
logging.getLogger("transformers.modeling_utils").debug("a library's debug line")
logging.getLogger("dlngraph.runtime.trainer").warning("dlngraph's own warning")
logging.getLogger("dlngraph.runtime.trainer").info("dlngraph's progress")
print("the result")
"""


@pytest.mark.parametrize(
    ("verbose", "shown"),
    [
        (0, {"dlngraph's own warning"}),
        (1, {"dlngraph's own warning", "dlngraph's progress", "a library's warning", "a dependency's deprecation"}),
        (2, {"dlngraph's own warning", "dlngraph's progress", "a library's warning", "a dependency's deprecation",
             "a library's debug line"}),
    ],
)  # fmt: skip
def test_verbosity_levels_route_logs_and_warnings_to_stderr(verbose: int, shown: set[str]) -> None:
    done = subprocess.run([sys.executable, "-c", _EMIT.format(verbose=verbose)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the result\n"
    every = {"dlngraph's own warning", "dlngraph's progress", "a library's warning", "a dependency's deprecation",
             "a library's debug line"}  # fmt: skip
    assert {text for text in every if text in done.stderr} == shown
