"""`dlngraph report`: a run directory as one self-contained HTML page.

The page needs no network at view time: CSS is inline, the network diagram
and the charts are inline SVG drawn here in pure Python, and there is no script.
"""

from __future__ import annotations

from pathlib import Path

from dlngraph.report.page import render_page
from dlngraph.report.rundir import RunDir, load_run

__all__ = ["RunDir", "load_run", "render_page", "write_report"]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render RUN_DIR to OUT (default RUN_DIR/report.html) and return the path written."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_page(run), encoding="utf-8")
    tmp.replace(target)  # atomic: a browser never sees half a page
    return target
