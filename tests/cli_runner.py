"""Running `dlngraph` in-process for tests: one helper for every CLI test file."""

from __future__ import annotations

import logging

import pytest

from dlngraph.cli import main


def invoke(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """`dlngraph ARGS` in this process: (exit code, stdout, stderr)."""
    # The CLI configures logging once per process; let it bind to this test's stderr.
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
