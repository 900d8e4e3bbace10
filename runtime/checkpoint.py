"""Checkpoints: plain YAML (no pickle), written atomically by `runtime.files`.

A crash (even SIGKILL) leaves either the old checkpoint or the new one, never
half of one; reading one that is unreadable or malformed is a RuntimeFailure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dlngraph.errors import RuntimeFailure


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
