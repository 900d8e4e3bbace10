"""Rendering an `ExecutionPlan`: a readable text summary, Graphviz DOT, Mermaid.

All three are deterministic (sorted) so they can be snapshot-tested. Dataset
inputs and scored targets appear as their own shapes so the picture shows
where data enters and what is scored.
"""

from __future__ import annotations

import json

from dlngraph.compiler.plan import BatchedCall, Estimate, ExecutionPlan, NodeKind, PlanNode, Stage


def render(plan: ExecutionPlan, fmt: str) -> str:
    return {"text": text, "json": lambda p: p.to_json(), "dot": dot, "mermaid": mermaid}[fmt](plan)


# --------------------------------------------------------------------------- text


def text(plan: ExecutionPlan) -> str:
    train = plan.spec.train
    out = [f"plan {plan.name}  ({plan.spec_path.name})", "", f"nodes ({len(plan.nodes)}):"]
    width = max(len(n) for n in plan.nodes)
    for name in plan.topological_order:
        out.append(f"  {name:<{width}}  {_describe(plan.nodes[name])}")
    if plan.think:
        out += ["", "think (once, before the forward):"]
        out += _stages(plan.think, with_nodes=False)
    stages = f"{len(plan.forward)} stage{'s' if len(plan.forward) != 1 else ''}"
    out += ["", f"forward ({stages}; one batched call per node, sized for a batch of {train.batch_size}):"]
    out += [f"  stage {s.index}: {', '.join(s.nodes)}" for s in plan.forward]
    out += ["", f"backward per iteration (B={train.batch_size}, K={train.posterior_samples}, N={train.prompt_proposals}):"]
    out += _stages(plan.backward, with_nodes=True) or ["  (nothing to train)"]
    out += ["", "estimates (tokens ~ characters / 4; generated text counted at max_tokens):"]
    out.append(f"  per iteration: {_estimate(plan.estimate_per_iteration)}")
    if plan.evaluations():
        dev = plan.evaluation[0].calls[0]
        examples = _examples(dev, plan)
        out.append(f"  dev evaluations: {plan.evaluations()} x {examples} examples")
    trains = any(n.trainable for n in plan.nodes.values())
    iterations = f"{train.iterations} iterations" if trains else "nothing trainable: no iterations"
    out.append(f"  fit ({iterations}): {_estimate(plan.estimate())}")
    return "\n".join(out) + "\n"


def _describe(node: PlanNode) -> str:
    output = "text" if node.output_type == "text" else f"choice [{' | '.join(node.choices)}]"
    reads = ", ".join([*node.inputs, *node.parents])
    parts = [node.kind, output, f"backend {node.backend} ({node.backend_kind})"]
    if node.trainable:
        parts.append("trainable" + (f" (proposals by {node.proposer})" if node.proposer != node.backend else ""))
    if node.demos:
        parts.append(f"{node.demos} demos")
    if node.calibration != "none":
        parts.append(f"calibration {node.calibration}")
    parts.append(f"reads {reads}" if reads else "reads nothing")
    if node.target:
        parts.append(f"scored against '{node.target}'")
    return "  ".join(parts)


def _stages(stages: tuple[Stage, ...], *, with_nodes: bool) -> list[str]:
    out = []
    for stage in stages:
        if not stage.calls:
            continue
        if with_nodes:
            out.append(f"  stage {stage.index} [{', '.join(stage.nodes)}]:")
        out += [f"    {_call(c)}" for c in stage.calls]
    return out


def _call(c: BatchedCall) -> str:
    return (
        f"{c.purpose:<18} {c.op:<8} on {c.backend:<8} {c.requests:>6} requests  "
        f"~{c.prompt_tokens:,} prompt + ~{c.completion_tokens:,} completion tokens  ({', '.join(c.nodes)})"
    )


def _estimate(e: Estimate) -> str:
    return (
        f"{e.calls:,} calls, {e.requests:,} requests, "
        f"~{e.prompt_tokens:,} prompt + ~{e.completion_tokens:,} completion tokens"
    )


def _examples(call: BatchedCall, plan: ExecutionPlan) -> int:
    node = plan.nodes[call.nodes[0]]
    per = len(node.choices) if call.op == "score" else 1
    return call.requests // per


# --------------------------------------------------------------------------- graphs


def _inputs(plan: ExecutionPlan) -> list[str]:
    return sorted({i for n in plan.nodes.values() for i in n.inputs})


def dot(plan: ExecutionPlan) -> str:
    q = json.dumps  # a JSON string is a valid DOT quoted ID
    out = [f"digraph {q(plan.name)} {{", "  rankdir=LR;", "  node [fontname=Helvetica];"]
    for field in _inputs(plan):
        out.append(f"  {q('input:' + field)} [label={q(field)}, shape=ellipse, style=dashed];")
    for node in plan.nodes.values():
        shape = "hexagon" if node.kind == NodeKind.DEEP_THINKING else "box"
        style = ", style=bold" if node.trainable else ""
        out.append(f"  {q(node.name)} [label={q(node.name + chr(10) + node.output_type)}, shape={shape}{style}];")
    for node in plan.nodes.values():
        for field in node.inputs:
            out.append(f"  {q('input:' + field)} -> {q(node.name)};")
        for parent in node.parents:
            out.append(f"  {q(parent)} -> {q(node.name)};")
        if node.target:
            out.append(f"  {q('target:' + node.name)} [label={q(node.target)}, shape=note];")
            out.append(f"  {q(node.name)} -> {q('target:' + node.name)} [style=dashed];")
    out.append("}")
    return "\n".join(out) + "\n"


def mermaid(plan: ExecutionPlan) -> str:
    ids = {field: f"in{i}" for i, field in enumerate(_inputs(plan))}
    out = ["flowchart LR"]
    for field, ident in ids.items():
        out.append(f"  {ident}([{_mq(field)}])")
    for node in plan.nodes.values():
        label = _mq(f"{node.name}: {node.output_type}")
        out.append(f"  n_{node.name}{{{{{label}}}}}" if node.kind == NodeKind.DEEP_THINKING else f"  n_{node.name}[{label}]")
    for node in plan.nodes.values():
        out += [f"  {ids[field]} --> n_{node.name}" for field in node.inputs]
        out += [f"  n_{parent} --> n_{node.name}" for parent in node.parents]
        if node.target:
            out.append(f"  t_{node.name}[/{_mq(node.target)}/]")
            out.append(f"  n_{node.name} -.-> t_{node.name}")
    return "\n".join(out) + "\n"


def _mq(label: str) -> str:
    """A Mermaid label in quotes, with quotes escaped."""
    return '"' + label.replace('"', "#quot;") + '"'
