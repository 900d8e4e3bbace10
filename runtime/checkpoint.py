"""Checkpoints: plain YAML (no pickle), written atomically by `runtime.files`.

A crash (even SIGKILL) leaves either the old checkpoint or the new one, never
half of one; reading one that is unreadable or malformed is a RuntimeFailure.
A checkpoint (`checkpoints/iter-NNNN.yaml`, `best.yaml`) holds the learned
parameters under `prompts:` ({node: prompt}), `demos:` ({node: [demonstration]})
and `calibration:` ({node: {label: prior}}), beside the fit's own state.
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


def load_learned(path: str | Path) -> dict[str, dict[str, Any]]:
    """A checkpoint's learned parameters as `Executor` keywords: `prompts`, `demos`, `calibration`."""
    path = Path(path)
    data = load_yaml(path)
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise RuntimeFailure(
            f"checkpoint {path} has no `prompts:` mapping of node names to prompt strings",
            hint="checkpoints are written by `dlngraph fit`",
        )
    assert isinstance(data, dict)  # it holds `prompts`
    return {
        "prompts": {str(k): v for k, v in prompts.items()},
        "demos": dict(data.get("demos") or {}),
        "calibration": dict(data.get("calibration") or {}),
    }
