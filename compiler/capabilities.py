"""Pass 5, capabilities: every node's needs against its backend's capabilities.

REQUIRES "acyclic". GUARANTEES "capable": `unit.capabilities` maps every
backend to its capability set, and each node's backend meets its needs; a
choice node on a backend that reads choices from top-k next-token log-probs
only has single-token choices, where the caller's `token_counter` can count.
Capabilities are data: a backend spec's own `capabilities:` list, else what
its kind declares in `dlngraph.capabilities.DECLARED`, unless the caller
passes a `capability_resolver` (the API passes one that probes litellm
endpoints only when asked: `dlngraph compile --probe`). So by default the
result depends on the spec alone, never on a server or an API key. Nothing
of the runtime is imported here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import replace

from dlngraph.capabilities import DECLARED, Capability
from dlngraph.errors import Diagnostic, SpecError
from dlngraph.yamlsource import Source

from dlngraph.compiler.ir import NodeKind, Unit, nodes
from dlngraph.compiler.plan import PlanNode

REQUIRES = frozenset({"acyclic"})
GUARANTEES = frozenset({"capable"})

G, S, T, KV = Capability.GENERATE, Capability.SCORE, Capability.TOP_LOGPROBS, Capability.KV_ACCESS


def declared_capabilities(backend_name: str, backend_spec: object) -> frozenset[Capability]:
    """The default resolver: the spec's `capabilities:` list, else the kind's declaration.

    Raises KeyError for a kind that is not built in and declares nothing, and
    ValueError for a capability name that does not exist.
    """
    listed = getattr(backend_spec, "capabilities", None)
    if listed is not None:
        return frozenset(Capability(c) for c in listed)
    return DECLARED[getattr(backend_spec, "kind")]


def needs(data: PlanNode, proposer: str | None = None) -> list[tuple[str, frozenset[Capability]]]:
    """What a node needs of its own backend, as (reason, any-of set) pairs: each set
    needs one member. With a `proposer` backend, proposals are not its own backend's."""
    if data.kind is NodeKind.DEEP_THINKING:
        return [("deep_thinking nodes update attention K/V", frozenset({KV}))]
    out = []
    if data.output_type == "choice":
        out.append(("choice outputs score each choice", frozenset({S, T})))
    else:
        out.append(("text layers generate text", frozenset({G})))
    if data.trainable and proposer is None:
        out.append(("trainable layers generate prompt proposals", frozenset({G})))
        if data.output_type == "text":
            out.append(("trainable text layers score continuations", frozenset({S})))
    return out


def run(unit: Unit) -> Unit:
    assert unit.spec is not None and unit.graph is not None and unit.source is not None
    resolver = unit.capability_resolver or declared_capabilities
    source = unit.source
    problems: list[Diagnostic] = []
    capabilities: dict[str, frozenset[Capability]] = {}
    for name, backend in unit.spec.backends.items():
        try:
            capabilities[name] = frozenset(resolver(name, backend))
        except KeyError:
            problems.append(_unknown_kind(name, backend.kind, source))
        except ValueError as exc:
            problems.append(_unknown_capability(name, backend, str(exc), source))
    # Backends of choice nodes that read choices from next-token log-probs only, and a way
    # to count their tokens (asked once per backend: the runtime loads a tokenizer to answer).
    choosing = {d.backend for d in nodes(unit.graph).values() if d.output_type == "choice"}
    counters = {
        name: unit.token_counter(name, unit.spec.backends[name])
        for name in sorted(choosing & capabilities.keys())
        if T in capabilities[name] and S not in capabilities[name] and unit.token_counter is not None
    }
    for data in nodes(unit.graph).values():
        have = capabilities.get(data.backend)
        if have is None:
            continue
        for reason, any_of in needs(data, unit.spec.train.proposer):
            if not have & any_of:
                problems.append(_missing(data, reason, any_of, have, unit, source))
        count = counters.get(data.backend)
        if data.output_type == "choice" and count is not None:
            problems += _multi_token_choices(data, count, unit, source)
    problems += _proposer_generates(unit, capabilities, source)
    if problems:
        raise SpecError(problems)
    return replace(unit, capabilities=capabilities)


def _proposer_generates(unit: Unit, capabilities: dict[str, frozenset[Capability]], source: Source) -> list[Diagnostic]:
    """`train.proposer` writes proposals and posterior samples: it must generate."""
    assert unit.spec is not None
    name = unit.spec.train.proposer
    have = capabilities.get(name) if name is not None else None
    if name is None or have is None or G in have:
        return []
    return [
        source.diagnostic(
            "E405",
            f"proposer backend '{name}' ({unit.spec.backends[name].kind}) cannot generate text",
            source.value_span(("train", "proposer")),
            hint=f"backend '{name}' has: {', '.join(sorted(have)) or 'nothing'}; name a backend with `generate` "
            "(or omit `proposer:` to let each node's own backend write its proposals)",
        )
    ]


def _multi_token_choices(data: PlanNode, count: Callable[[str], int], unit: Unit, source: Source) -> list[Diagnostic]:
    """Choices that are not one token as the runtime scores them: after one space,
    unless the template ends in whitespace (the target delimiter of `score_request`)."""
    assert unit.spec is not None
    spec = unit.spec.nodes[data.name]
    gap = "" if spec.template[-1:].isspace() else " "
    out = []
    for i, choice in enumerate(spec.output.choices):  # type: ignore[union-attr]
        tokens = count(gap + choice)
        if tokens != 1:
            out.append(source.diagnostic(
                "E404",
                f"choice {gap + choice!r} is {tokens} tokens, and backend '{data.backend}' scores choices "
                "from next-token log-probs, one token each",
                source.value_span(("nodes", data.name, "output", "choices", i)),
                node=data.name,
                hint="use single-token choices (e.g. 'A' instead of '(A)'), a backend that scores "
                "continuations (`score`: vLLM, or `kind: torch`), or declare `score` under `capabilities:` "
                "if the endpoint scores prompts correctly",
            ))
    return out


def _unknown_kind(name: str, kind: str, source: Source) -> Diagnostic:
    close = difflib.get_close_matches(kind, sorted(DECLARED), n=1, cutoff=0.6)
    guess = f"did you mean '{close[0]}'? " if close else ""
    return source.diagnostic(
        "E402",
        f"unknown backend kind '{kind}' for backend '{name}'",
        source.value_span(("backends", name, "kind")),
        hint=f"{guess}built-in kinds: {', '.join(sorted(DECLARED))}; a plugin kind must list "
        "its `capabilities:` (generate, score, top_logprobs, kv_access)",
    )


def _unknown_capability(name: str, backend: object, error: str, source: Source) -> Diagnostic:
    listed = list(getattr(backend, "capabilities", None) or [])
    valid = [c.value for c in Capability]
    bad = next((i for i, c in enumerate(listed) if c not in valid), None)
    path = ("backends", name, "capabilities") + ((bad,) if bad is not None else ())
    return source.diagnostic(
        "E403",
        f"backend '{name}': {error}",
        source.value_span(path),
        hint=f"capabilities are: {', '.join(valid)}",
    )


def _missing(
    data: PlanNode,
    reason: str,
    any_of: frozenset[Capability],
    have: frozenset[Capability],
    unit: Unit,
    source: Source,
) -> Diagnostic:
    assert unit.spec is not None
    kind = unit.spec.backends[data.backend].kind
    wanted = " or ".join(sorted(any_of))
    path = ("nodes", data.name, "backend")
    span = source.value_span(path) if path in source.spans else data.span
    torch_hint = "run it on a `kind: torch` backend" if KV in any_of else None
    return source.diagnostic(
        "E401",
        f"backend '{data.backend}' ({kind}) cannot {wanted}, which this node needs: {reason}",
        span,
        node=data.name,
        hint=torch_hint
        or f"backend '{data.backend}' has: {', '.join(sorted(have)) or 'nothing'}; use a backend with "
        f"{wanted}, declare it under `capabilities:` if the endpoint supports it (`dlngraph compile --probe` "
        "asks the endpoint), or set `trainable: false`",
    )
