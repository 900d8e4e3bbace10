"""Usage errors on the command line: exit 2 with the usage message, never a traceback.

Each argv goes through the real entry point (`dlngraph.cli.main`) in-process,
as the console script calls it. The arguments fail before any model loads
(unknown names, missing arguments, spec paths that do not exist), so the
property test stays fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlngraph.cli import _COMMANDS, main

# Commands that do their work with no argument at all rather than failing on a usage error.
_RUN_WITHOUT_ARGUMENTS = {"doctor", "schema", "init"}


@contextlib.contextmanager
def _isolated(tmp: Path) -> Iterator[None]:
    """Run in an empty directory with a private cache, so `init` or `cache clear` touch nothing real."""
    old_cwd, old_cache = Path.cwd(), os.environ.get("DLNGRAPH_CACHE_DIR")
    os.chdir(tmp)
    os.environ["DLNGRAPH_CACHE_DIR"] = str(tmp / "cache")
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("DLNGRAPH_CACHE_DIR", None)
        else:
            os.environ["DLNGRAPH_CACHE_DIR"] = old_cache


def _call(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dlngraph *argv`; any exception but SystemExit fails the test."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    assert isinstance(code, int) or code is None, code
    return code or 0, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["compil"], "compil"),
        (["compile"], "spec"),
        (["--bogus"], "--bogus"),
        (["compile", "spec.yaml", "--bogus"], "--bogus"),
        (["fit"], "spec"),
        (["cache", "nope"], "nope"),
        (["init", "--template", "nope"], "nope"),
    ],
)
def test_usage_error_exits_2_with_usage_and_no_traceback(argv: list[str], names: str, tmp_path: Path) -> None:
    """The message's wording is click's; the contract is exit 2, the usage line and the offending word."""
    with _isolated(tmp_path):
        code, out, err = _call(argv)
    assert code == 2, err
    assert "Usage: " in err
    assert names.lower() in err.strip().splitlines()[-1].lower()  # the error line, after the usage
    assert "Traceback" not in err + out and out == ""


def test_a_typo_gets_a_suggestion(tmp_path: Path) -> None:
    with _isolated(tmp_path):
        code, _, err = _call(["compil"])
    assert code == 2 and "'compile'" in err.strip().splitlines()[-1].split("'compil'", 1)[1]


def test_bare_command_shows_help_and_exits_2(tmp_path: Path) -> None:
    with _isolated(tmp_path):
        code, out, err = _call([])
    assert code == 2
    assert "Usage: " in out + err
    assert all(name in out + err for name in _COMMANDS)
    assert "Traceback" not in out + err


def test_installed_command_usage_error_exits_2_without_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "dlngraph", "compil"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "'compil'" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


_typos = st.sampled_from(_COMMANDS).flatmap(
    lambda name: st.integers(0, len(name) - 1).map(lambda i: name[:i] + name[i + 1 :])
)
_words = st.one_of(
    st.sampled_from(_COMMANDS),
    _typos,
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10),
)
_tail = st.one_of(
    st.sampled_from(
        ["--bogus", "-Z", "--out", "--split", "--limit", "--limit=x", "--json", "--help", "-v", "--template", "--",
         "missing.yaml", "dev", "nope", "clear", "stats", "-", ""]
    ),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
)  # fmt: skip
_globals = st.lists(st.sampled_from(["-v", "-vv", "--verbose", "--bogus", "--version", "--help"]), max_size=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=_globals, word=_words, tail=st.lists(_tail, max_size=4))
def test_random_argv_never_shows_a_traceback(before: list[str], word: str, tail: list[str], tmp_path: Path) -> None:
    if word == "doctor" or (word in _RUN_WITHOUT_ARGUMENTS and not tail):
        tail = [*tail, "--bogus"]  # a valid call is not a usage error (and doctor imports torch)
    with _isolated(tmp_path):
        code, out, err = _call([*before, word, *tail])
    assert "Traceback" not in out + err
    # 0: help or version; 1: a command refused (e.g. init over existing files); 2: usage or spec error.
    assert code in (0, 1, 2), (code, err)
    if code == 2 and word not in _COMMANDS:
        assert "Usage: " in out + err
