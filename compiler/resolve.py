"""Pass 3, resolve: names and template variables -> the graph.

REQUIRES "validated". GUARANTEES "resolved": `unit.graph` holds one PlanNode
per node, an edge parent -> child for every node a template names, and
passes `lint`. Checked here: node names usable as variables, backends that
exist, templates that parse, variables that name something (with a
did-you-mean), `prompt`/`label` used where they mean something, inputs that
some template reads, outputs that name nodes.
"""

from __future__ import annotations

import difflib
import keyword
from dataclasses import replace

import jinja2
import networkx as nx

from dlngraph.errors import MAX_SHOWN, Diagnostic, SpecError
from dlngraph.sandbox import MAX_CHARS, MAX_RENDER_SECONDS
from dlngraph.spec import DeepThinkingNode, Spec
from dlngraph.yamlsource import Source

from dlngraph.compiler import templates
from dlngraph.compiler.ir import Unit
from dlngraph.compiler.plan import PlanNode

REQUIRES = frozenset({"validated"})
GUARANTEES = frozenset({"resolved"})

PROMPT, LABEL, DEMOS = "prompt", "label", "demos"
_RESERVED = frozenset({PROMPT, LABEL, DEMOS, "loop", "self", "true", "false", "none", "True", "False", "None"})


def run(unit: Unit) -> Unit:
    assert unit.spec is not None and unit.source is not None
    spec, source = unit.spec, unit.source
    problems: list[Diagnostic] = []
    problems += _check_inputs(spec, source)
    problems += _check_backends(spec, source)
    names = frozenset(spec.nodes)
    inputs = frozenset(spec.inputs)
    graph = nx.DiGraph()
    used_inputs: set[str] = set()
    for name, node in spec.nodes.items():
        problems += _check_name(name, inputs, source)
        # did-you-mean costs O(nodes) per mistake: only for those that will be shown
        read, node_problems = _read_variables(name, node, names, inputs, source, suggest=len(problems) < MAX_SHOWN)
        problems += node_problems
        used_inputs |= read & inputs
        backend = spec.backend_of(name)
        graph.add_node(
            name,
            data=PlanNode.of(
                name,
                node,
                (backend, spec.backends[backend].kind if backend in spec.backends else ""),  # unknown: reported below
                (tuple(sorted(read & names)), tuple(sorted(read & inputs))),
                spec.outputs.get(name),
                source.key_span(("nodes", name)),
            ),
        )
        graph.add_edges_from((parent, name) for parent in read & names)
    if not any(p.code in ("E201", "E202", "E210") for p in problems):  # else the unused input is likely a symptom
        problems += _check_unused_inputs(spec, used_inputs, source)
    problems += _check_outputs(spec, source)
    if problems:
        raise SpecError(problems)
    return replace(unit, graph=graph)


def _read_variables(
    name: str, node, names: frozenset[str], inputs: frozenset[str], source: Source, *, suggest: bool = True
) -> tuple[set[str], list[Diagnostic]]:
    """Variables the node's templates read (inputs and parents), and what is wrong with them."""
    # (slot, sees nodes, own words): the name sets are shared, never copied per node.
    slots: list[tuple[str, bool, frozenset[str]]]
    if isinstance(node, DeepThinkingNode):
        slots = [("demo_template", False, frozenset({LABEL})), ("template", True, frozenset())]
    else:
        slots = [("template", True, frozenset({PROMPT, DEMOS}))]
    read: set[str] = set()
    problems: list[Diagnostic] = []
    for slot, sees_nodes, own in slots:
        path = ("nodes", name, slot)
        text = getattr(node, slot)
        try:
            found = templates.variables(text)
        except templates.RenderLimit as exc:
            problems.append(
                source.diagnostic(
                    "E210",
                    f"template in `{slot}` exceeds a render limit: {exc.message}",
                    source.value_span(path),
                    node=name,
                    hint=f"a template formats one example: it may write at most {MAX_CHARS:,} characters "
                    f"and run for at most {MAX_RENDER_SECONDS:g} s",
                )
            )
            continue
        except jinja2.TemplateSyntaxError as exc:
            problems.append(
                source.diagnostic(
                    "E201",
                    f"template syntax error in `{slot}`: {exc.message}",
                    templates.error_span(source, path, exc.lineno or 1),
                    node=name,
                    hint="Jinja syntax: `{{ variable }}` for values, `{% if ... %}...{% endif %}` for logic",
                )
            )
            continue
        known = {v for v in found if v in own or v in inputs or (sees_nodes and v in names)}
        for variable in sorted(found - known):
            allowed = own | inputs | (names if sees_nodes else frozenset())
            problems.append(_bad_variable(name, slot, variable, allowed, source, suggest=suggest))
        read |= known
        if slot == "template" and not isinstance(node, DeepThinkingNode) and node.trainable and PROMPT not in found:
            problems.append(
                source.diagnostic(
                    "E208",
                    "trainable layer's template does not use `{{ prompt }}`",
                    source.value_span(path),
                    node=name,
                    hint="put `{{ prompt }}` where the learnable instruction goes, or set `trainable: false`",
                )
            )
    read -= {PROMPT, LABEL, DEMOS}
    return read, problems


def _bad_variable(
    name: str, slot: str, variable: str, allowed: frozenset[str], source: Source, *, suggest: bool = True
) -> Diagnostic:
    span = templates.variable_span(source, ("nodes", name, slot), variable)
    if variable in (PROMPT, LABEL):
        where = {
            PROMPT: "only a layer's `template` has a learnable `prompt`",
            LABEL: "`label` is visible only in a deep_thinking node's `demo_template`",
        }[variable]
        return source.diagnostic(
            "E207", f"`{variable}` cannot be used in `{slot}`", span, node=name, hint=where
        )
    message = f"template variable `{variable}` in `{slot}` names no input or node"
    if not suggest:
        return source.diagnostic("E202", message, span, node=name)
    candidates = sorted(allowed - {name})
    close = difflib.get_close_matches(variable, candidates, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else None
    more = len(candidates) - _LISTED
    options = ", ".join(candidates[:_LISTED]) + (f", ... ({more:,} more)" if more > 0 else "")
    return source.diagnostic(
        "E202",
        message,
        span,
        node=name,
        hint=(hint + " " if hint else "") + f"(variables here: {options}; inputs are listed under `inputs:`)",
    )


_LISTED = 20  # names listed in a hint


def _check_name(name: str, inputs: frozenset[str], source: Source) -> list[Diagnostic]:
    why = None
    if not name.isidentifier() or keyword.iskeyword(name):
        why = "is not a valid identifier (letters, digits and '_', not starting with a digit)"
    elif name in _RESERVED:
        why = "is reserved"
    elif name in inputs:
        why = "is also a dataset input, so `{{ " + name + " }}` would be ambiguous"
    if why is None:
        return []
    return [
        source.diagnostic(
            "E206",
            f"node name '{name}' {why}",
            source.key_span(("nodes", name)),
            node=name,
            hint="node names are template variables of their children; rename the node",
        )
    ]


def _check_inputs(spec: Spec, source: Source) -> list[Diagnostic]:
    seen: set[str] = set()
    out = []
    for i, field in enumerate(spec.inputs):
        if field in seen:
            out.append(
                source.diagnostic(
                    "E104", f"input '{field}' is listed twice", source.value_span(("inputs", i)),
                    hint="remove the repeated entry",
                )
            )  # fmt: skip
        seen.add(field)
    return out


def _check_backends(spec: Spec, source: Source) -> list[Diagnostic]:
    out = []
    defined = sorted(spec.backends)
    if spec.default_backend is not None and spec.default_backend not in spec.backends:
        out.append(_unknown_backend(spec.default_backend, ("default_backend",), defined, source, None))
    for name, node in spec.nodes.items():
        if node.backend is not None and node.backend not in spec.backends:
            out.append(_unknown_backend(node.backend, ("nodes", name, "backend"), defined, source, name))
    return out


def _unknown_backend(backend: str, path, defined: list[str], source: Source, node: str | None) -> Diagnostic:
    close = difflib.get_close_matches(backend, defined, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return source.diagnostic(
        "E203",
        f"unknown backend '{backend}'",
        source.value_span(path),
        node=node,
        hint=f"{hint}backends defined under `backends:`: {', '.join(defined)}",
    )


def _check_unused_inputs(spec: Spec, used: set[str], source: Source) -> list[Diagnostic]:
    return [
        source.diagnostic(
            "E204",
            f"input '{field}' is not read by any template",
            source.value_span(("inputs", i)),
            hint=f"use `{{{{ {field} }}}}` in a template or remove it from `inputs:`",
        )
        for i, field in enumerate(spec.inputs)
        if field not in used and field not in spec.inputs[:i]
    ]


def _check_outputs(spec: Spec, source: Source) -> list[Diagnostic]:
    out = []
    for node in spec.outputs:
        if node in spec.nodes:
            continue
        close = difflib.get_close_matches(node, sorted(spec.nodes), n=1, cutoff=0.6)
        out.append(
            source.diagnostic(
                "E205",
                f"output names node '{node}', which does not exist",
                source.key_span(("outputs", node)),
                hint=(f"did you mean '{close[0]}'? " if close else "")
                + f"nodes: {', '.join(sorted(spec.nodes))}",
            )
        )
    return out
