"""`dlngraph report`: a run directory as one self-contained HTML page.

The page needs no network at view time: CSS is inline, the network diagram
and the charts are inline SVG drawn here in pure Python, and there is no script.
"""

from __future__ import annotations

from pathlib import Path

from dlngraph.report.page import render_page
from dlngraph.report.rundir import RunRecord, load_run
from dlngraph.runtime.files import check_output, write_atomic
from dlngraph.runtime.rundir import RunDir

__all__ = ["RunRecord", "load_run", "render_page", "write_report"]


def write_report(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False) -> Path:
    """Render RUN_DIR to OUT (default RUN_DIR/report.html, replaced on every run) and
    return the path written. An OUT that exists is replaced only with `force`, and
    never when it is one of the run's own files."""
    run = load_run(run_dir)
    files = RunDir(run.path)
    if out is None:
        target = files.report
    else:
        target = check_output(out, protected=files.own_files(), force=force)
    return write_atomic(target, render_page(run))  # atomic: a browser never sees half a page
