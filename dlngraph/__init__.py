"""dlngraph: declarative deep language networks.

Importing this package is cheap and has no side effects: heavy pieces (torch,
litellm, the compiler) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dlngraph.errors import DlngraphError, RuntimeFailure, SpecError
from dlngraph.spec import Spec

__version__ = "0.1.0"

_LAZY = {
    "compile_spec": "dlngraph.api",
    "load_plan": "dlngraph.api",
    "evaluate": "dlngraph.api",
    "export": "dlngraph.api",
    "fit": "dlngraph.api",
    "run": "dlngraph.api",
}

__all__ = ["DlngraphError", "RuntimeFailure", "Spec", "SpecError", "__version__", *sorted(_LAZY)]

if TYPE_CHECKING:  # pragma: no cover
    from dlngraph.api import compile_spec, evaluate, export, fit, load_plan, run


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dlngraph' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
