"""Finding backend classes through the `dlngraph.backends` entry point group.

The built-in backends register the same way a third-party package would (see
pyproject.toml), so there is one lookup path for all of them. `open_backends`
opens the ones a plan uses, behind the response cache.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import Backend
from dlngraph.runtime.cache import Cache, CachedBackend, MemoryCache

if TYPE_CHECKING:
    from dlngraph.compiler.plan import ExecutionPlan

log = logging.getLogger(__name__)

GROUP = "dlngraph.backends"


def backend_kinds() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def backend_class(kind: str) -> type:
    found = [ep for ep in entry_points(group=GROUP) if ep.name == kind]
    if not found:
        raise RuntimeFailure(
            f"no backend of kind '{kind}' is installed",
            hint=f"installed kinds: {', '.join(backend_kinds()) or 'none'}",
        )
    try:
        return found[0].load()
    except ImportError as exc:
        raise RuntimeFailure(f"backend kind '{kind}' could not be imported: {exc}") from exc


def create_backend(name: str, backend_spec: Any, *, cache: Cache | MemoryCache | None) -> Backend:
    """Build the backend `name` of a spec, wrapped with `cache` unless it is None."""
    backend = backend_class(backend_spec.kind)(backend_spec)
    log.info("backend %s: %s (%s)", name, backend_spec.kind, backend.identity)
    return CachedBackend(backend, cache) if cache is not None else backend


def open_backends(
    plan: ExecutionPlan, *, cache_dir: str | Path | None = None, no_cache: bool = False
) -> dict[str, Backend]:
    """The backends the plan's nodes (and their proposers) use, each behind the response cache in
    `cache_dir`; with `no_cache` behind an in-memory one that dedupes within this run only.
    The caller closes them."""
    cache = MemoryCache() if no_cache else Cache(cache_dir)
    used = sorted({n.backend for n in plan.nodes.values()} | {n.proposer for n in plan.nodes.values() if n.proposer})
    return {name: create_backend(name, plan.spec.backends[name], cache=cache) for name in used}
