"""The pass manager: runs the compiler passes in order and checks their contracts.

Each pass module declares REQUIRES and GUARANTEES, sets of property names
checkable on a `Unit` (`ir.PROPERTIES`). Before a pass runs, every property it
requires must have been guaranteed by an earlier pass; after it runs, every
property it guarantees must hold. A broken contract or an unexpected
exception names the pass: that is a compiler bug. User mistakes are
`SpecError`s and pass through untouched.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from dlngraph.errors import SpecError

from dlngraph.compiler import (
    capabilities,
    data_checks,
    graph_checks,
    meta_prompts,
    parse,
    resolve,
    schedule,
    validate,
)
from dlngraph.compiler.ir import PROPERTIES, CapabilityResolver, TokenCounter, Unit

PASSES: tuple[ModuleType, ...] = (
    parse,
    validate,
    resolve,
    graph_checks,
    capabilities,
    data_checks,
    meta_prompts,
    schedule,
)


class PassContractError(AssertionError):
    """A pass ran out of order or did not deliver what it guarantees (a compiler bug)."""


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Unit], Unit]
    requires: frozenset[str]
    guarantees: frozenset[str]

    @classmethod
    def of(cls, module: ModuleType) -> "Pass":
        return cls(module.__name__.rsplit(".", 1)[-1], module.run, module.REQUIRES, module.GUARANTEES)


def check_order(passes: Sequence[Pass]) -> None:
    """Raise PassContractError if some pass requires what no earlier pass guarantees."""
    have: set[str] = set()
    for p in passes:
        missing = p.requires - have
        if missing:
            raise PassContractError(f"pass '{p.name}' requires {sorted(missing)}, which no earlier pass guarantees")
        have |= p.guarantees


def run_passes(unit: Unit, passes: Sequence[Pass], after_each: Callable[[str, Unit], None] | None = None) -> Unit:
    check_order(passes)
    with _gc_paused():
        for p in passes:
            unit = _run_one(p, unit, after_each)
    return unit


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while compiling.

    Compiling allocates many small acyclic objects; with the collector on,
    its repeated full scans made a 50,000-node spec take twice as long
    (superlinear growth). The collector runs again as soon as we are done.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _run_one(p: Pass, unit: Unit, after_each: Callable[[str, Unit], None] | None) -> Unit:
    try:
        unit = p.run(unit)
    except SpecError:
        raise
    except Exception as exc:
        exc.add_note(f"in compiler pass '{p.name}'")
        raise
    broken = sorted(g for g in p.guarantees if not PROPERTIES[g](unit))
    if broken:
        raise PassContractError(f"pass '{p.name}' did not establish {broken}")
    if after_each is not None:
        after_each(p.name, unit)
    return unit


def compile_unit(
    path: str | Path,
    *,
    raw: bytes | None = None,
    capability_resolver: CapabilityResolver | None = None,
    token_counter: TokenCounter | None = None,
    after_each: Callable[[str, Unit], None] | None = None,
) -> Unit:
    """Run every pass over the spec at `path` (or over `raw`, its bytes)."""
    unit = Unit(path=Path(path), raw=raw, capability_resolver=capability_resolver, token_counter=token_counter)
    return run_passes(unit, [Pass.of(m) for m in PASSES], after_each)
