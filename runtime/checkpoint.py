"""Checkpoints: plain YAML (no pickle), written atomically.

A checkpoint is written to a temporary file in the same directory, flushed to
disk and moved over the target with `os.replace`, so a crash (even SIGKILL)
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dlngraph.errors import RuntimeFailure


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, yaml.safe_dump(data, sort_keys=True, allow_unicode=True, width=100))


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; unreadable or malformed files are a RuntimeFailure."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RuntimeFailure(f"{path} is not valid YAML: {exc}") from exc


def read_yaml(path: Path) -> dict[str, Any]:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RuntimeFailure(f"{path} does not hold a mapping")
    return data
