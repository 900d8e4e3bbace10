"""The public Python API: compile a spec into an `ExecutionPlan`, load a saved plan.

`compile_spec` is what `dlngraph compile` runs. It is offline: it reads the
spec, its data files and, for a litellm backend that names a `tokenizer`, that
tokenizer from local files, and sends no request, so a spec compiles the same
with or without a server or an API key. Backends have their declared
capabilities (the spec's `capabilities:` list, else the kind's).
`probe_timeout` asks litellm endpoints instead, all within that many seconds.
`capability_resolver` is the general hook: `(backend_name, backend_spec) ->
frozenset[Capability]`; raising KeyError means "unknown kind".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dlngraph.errors import DlngraphError

from dlngraph.compiler.ir import CapabilityResolver, TokenCounter
from dlngraph.compiler.pipeline import compile_unit
from dlngraph.compiler.plan import ExecutionPlan


def compile_spec(
    path: str | Path,
    *,
    capability_resolver: CapabilityResolver | None = None,
    probe_timeout: float | None = None,
) -> ExecutionPlan:
    """Check the spec at `path` and build its plan; raises `SpecError` on any mistake.
    With `probe_timeout` (seconds), litellm endpoints the spec points at are asked
    what they support, every request within that time together."""
    if capability_resolver is None and probe_timeout is not None:
        capability_resolver = probing_resolver(probe_timeout)
    unit = compile_unit(path, capability_resolver=capability_resolver, token_counter=runtime_token_counter())
    assert unit.plan is not None
    return unit.plan


def probing_resolver(timeout: float) -> CapabilityResolver:
    # The runtime's prober, imported only when asked to probe (no litellm import here).
    from dlngraph.runtime.backends.litellm_backend import probing_resolver as resolver

    return resolver(timeout)


def runtime_token_counter() -> TokenCounter:
    from dlngraph.runtime.backends.litellm_backend import token_counter

    return token_counter


def load_plan(path: str | Path, *, capability_resolver: CapabilityResolver | None = None) -> ExecutionPlan:
    """The plan of a spec YAML, or of a plan JSON written by `dlngraph compile --format json`.

    A plan JSON names its spec (a file beside it) and the spec's SHA-256; the
    plan is recompiled from that spec, and a spec changed since is an error,
    so a stale plan never runs.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        return compile_spec(path, capability_resolver=capability_resolver)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        spec_path = path.parent / saved["spec"]
        digest = saved["spec_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DlngraphError(f"error: {path} is not a plan written by `dlngraph compile --format json`: {exc}") from None
    if not spec_path.is_file() or hashlib.sha256(spec_path.read_bytes()).hexdigest() != digest:
        raise DlngraphError(
            f"error: plan {path} is stale: its spec {spec_path} is missing or has changed; "
            "run `dlngraph compile` again"
        )
    return compile_spec(spec_path, capability_resolver=capability_resolver)
