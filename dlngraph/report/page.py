"""The report page: one HTML string with inline CSS and SVG, nothing fetched at view time.

Each `_section_*` function turns one part of a `RunRecord` into HTML and returns
"" when the run has no data for it. Every piece of run text goes through
`html.escape`.
"""

from __future__ import annotations

from html import escape
from typing import Any

from dlngraph.report.charts import line_chart
from dlngraph.report.diagram import network_svg
from dlngraph.report.rundir import RunRecord
from dlngraph.report.worddiff import word_diff

POSTERIOR_EXAMPLES = 3  # examples shown per hidden node
USAGE_FIELDS = ("calls", "requests", "prompt_tokens", "completion_tokens", "cost", "seconds")

CSS = """
:root { --fg:#1f2937; --muted:#6b7280; --line:#e5e7eb; --accent:#2563eb; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1100px; padding: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 10px;
       border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.muted { color: var(--muted); } code, pre { font: 12.5px/1.45 ui-monospace, Menlo, Consolas, monospace; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; flex: 1 1 100px; }
.card b { display: block; font-size: 20px; white-space: nowrap; } .card span { color: var(--muted); font-size: 12px; }
svg text { font: 12px system-ui, sans-serif; }
.network .box rect { stroke-width: 1.5; } .network .label { font-weight: 600; text-anchor: middle; }
.network .sub { fill: var(--muted); font-size: 11px; text-anchor: middle; }
.network .input rect, .network .target rect { fill: #f3f4f6; stroke: #9ca3af; }
.network .hidden rect { fill: #eff6ff; stroke: #3b82f6; } .network .output rect { fill: #ecfdf5; stroke: #10b981; }
.chart .grid { stroke: #eef0f3; } .chart .axis { stroke: #9ca3af; }
.chart .tick { fill: var(--muted); font-size: 11px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 2px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f9fafb; font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
.step { border-left: 3px solid var(--line); padding: 2px 0 2px 12px; margin: 8px 0; }
.step.best { border-left-color: #10b981; }
.prompt { white-space: pre-wrap; background: #f9fafb; border-radius: 6px; padding: 6px 10px; margin: 4px 0; }
del { background: #fee2e2; color: #991b1b; } del + ins { margin-left: 1px; }
ins { background: #dcfce7; color: #166534; text-decoration: none; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 9px; background: #e5e7eb; }
.badge.best, .badge.fixed { background: #d1fae5; color: #065f46; }
.badge.broken { background: #fee2e2; color: #991b1b; }
.cand { display: grid; grid-template-columns: 110px 1fr; gap: 8px; align-items: start; margin: 2px 0; }
.cand .w { display: flex; align-items: center; gap: 6px; }
.cand .bar { height: 8px; background: #93c5fd; border-radius: 4px; }
.cand.chosen .text { font-weight: 600; } .cand .text { white-space: pre-wrap; }
.example { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; margin: 8px 0; }
pre.input { white-space: pre-wrap; margin: 2px 0 6px; color: #374151; } td.value { white-space: pre-wrap; }
details pre { background: #f9fafb; padding: 10px; border-radius: 6px; overflow-x: auto; }
"""


def _text(value: Any) -> str:
    """Escaped text; a {field: value} mapping (several inputs or outputs) as one line per field."""
    if value is None:
        return "–"
    if isinstance(value, dict):
        return "\n".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in sorted(value.items()))
    return escape(str(value))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _usage(field: str, value: float | None) -> str:
    if value is None:
        return "–"
    if field == "cost":
        return f"{value:.4f}"
    return f"{value:.2f}" if field == "seconds" else f"{int(value):,}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _candidate(text: Any) -> str:
    """A sampled hidden output; an empty one is shown as such, not as nothing."""
    return escape(str(text)) if str(text or "").strip() else '<span class="muted">(empty)</span>'


def _total(run: RunRecord, field: str) -> float:
    return sum(m.get(field) or 0 for m in run.metrics)


def _node_order(run: RunRecord) -> list[str]:
    """Nodes in forward (topological) order; stage members sorted by name."""
    staged = [n for stage in run.plan.get("forward", []) for n in sorted(stage["nodes"])]
    return staged + sorted(set(run.plan.get("nodes", {})) - set(staged))


def _section_summary(run: RunRecord) -> str:
    dev = [m["dev_acc"] for m in run.metrics if m.get("dev_acc") is not None]
    cards = [
        ("iterations", str(max((m["iteration"] for m in run.metrics), default=0))),
        ("initial dev accuracy", _pct(dev[0] if dev else None)),
        ("best dev accuracy", _pct(run.best.get("dev_acc"))),
        ("best iteration", _text(run.best.get("iteration"))),
        ("calls", _usage("calls", _total(run, "calls"))),
        ("tokens", _usage("tokens", _total(run, "prompt_tokens") + _total(run, "completion_tokens"))),
        ("cost", "$" + _usage("cost", _total(run, "cost"))),
        ("time", _duration(_total(run, "seconds"))),
    ]
    body = "".join(f'<div class="card"><b>{value}</b><span>{escape(label)}</span></div>' for label, value in cards)
    return f'<div class="cards" id="summary">{body}</div>'


def _section_network(run: RunRecord) -> str:
    return f'<section id="network"><h2>Network</h2>{network_svg(run.plan)}</section>'


def _section_curves(run: RunRecord) -> str:
    accuracy = {
        split: [(m["iteration"], m[f"{split}_acc"]) for m in run.metrics if m.get(f"{split}_acc") is not None]
        for split in ("train", "dev")
    }
    nodes = sorted({n for m in run.metrics for n in (m.get("loss") or {})})
    loss = {
        node: [(m["iteration"], m["loss"][node]) for m in run.metrics if (m.get("loss") or {}).get(node) is not None]
        for node in nodes
    }
    charts = line_chart(
        "accuracy per split", {k: v for k, v in accuracy.items() if v}, y_range=(0.0, 1.0), css="accuracy"
    )
    charts += line_chart("loss per node", {k: v for k, v in loss.items() if v}, css="loss")
    if not charts:
        return ""
    return f'<section id="curves"><h2>Learning curves</h2><div class="charts">{charts}</div></section>'


def _prompt_steps(run: RunRecord, node: str) -> list[tuple[int, str]]:
    """(iteration, prompt) for the first checkpoint and every later change of NODE's prompt."""
    steps: list[tuple[int, str]] = []
    for checkpoint in run.checkpoints:
        prompt = (checkpoint.get("prompts") or {}).get(node)
        if prompt is not None and (not steps or steps[-1][1] != prompt):
            steps.append((int(checkpoint.get("iteration", 0)), prompt))
    return steps


def _section_prompts(run: RunRecord) -> str:
    best_prompts = run.best.get("prompts") or {}
    blocks = []
    for node in _node_order(run):
        steps = _prompt_steps(run, node)
        if not steps:
            continue
        items = []
        for i, (iteration, prompt) in enumerate(steps):
            text = escape(prompt) if i == 0 else word_diff(steps[i - 1][1], prompt)
            is_best = best_prompts.get(node) == prompt
            label = "initial" if i == 0 else f"accepted at iteration {iteration}"
            badge = ' <span class="badge best">best</span>' if is_best else ""
            items.append(
                f'<div class="step{" best" if is_best else ""}" data-iteration="{iteration}">'
                f'<span class="muted">{escape(label)}</span>{badge}<div class="prompt">{text}</div></div>'
            )
        changes = len(steps) - 1
        blocks.append(
            f'<h3 data-node="{escape(node)}">{escape(node)} <span class="muted">'
            f'({changes} accepted change{"s" if changes != 1 else ""})</span></h3>{"".join(items)}'
        )
    return f'<section id="prompts"><h2>Prompts</h2>{"".join(blocks)}</section>' if blocks else ""


def _chosen_index(record: dict[str, Any]) -> int | None:
    chosen, texts = record.get("chosen"), [c.get("text") for c in record.get("candidates", [])]
    if isinstance(chosen, int) and not isinstance(chosen, bool):
        return chosen
    return texts.index(chosen) if chosen in texts else None


def _posterior_example(record: dict[str, Any]) -> str:
    chosen = _chosen_index(record)
    rows = []
    for i, cand in enumerate(record.get("candidates", [])):
        weight = float(cand.get("weight") or 0.0)
        rows.append(
            f'<div class="cand{" chosen" if i == chosen else ""}"><div class="w"><div class="bar" '
            f'style="width:{max(2, round(60 * weight))}px"></div><span class="muted">{weight:.2f}</span></div>'
            f'<div class="text">{"&#10003; " if i == chosen else ""}{_candidate(cand.get("text"))}</div></div>'
        )
    return (
        f'<div class="example"><span class="muted">example {_text(record.get("example"))}</span>'
        f'<pre class="input">{_text(record.get("input"))}</pre>{"".join(rows)}</div>'
    )


def _section_learned(run: RunRecord) -> str:
    """The best parameters besides the prompts: each layer's demonstrations and fitted label prior."""
    shown, priors = run.best.get("demos") or {}, run.best.get("calibration") or {}
    blocks = []
    for node in _node_order(run):
        parts = []
        if node in priors:
            cells = "".join(
                f"<tr><td>{escape(str(label))}</td><td class=\"num\">{float(value):.3f}</td></tr>"
                for label, value in sorted(priors[node].items())
            )
            parts.append(
                '<p class="muted">label prior divided out of the choice scores (mean log-prob):</p>'
                f'<table class="prior"><tr><th>label</th><th>prior</th></tr>{cells}</table>'
            )
        if node in shown:
            items = "".join(
                f'<li><div class="prompt">{escape(chr(10).join(f"{k}: {v}" for k, v in sorted(d.items())))}</div></li>'
                for d in shown[node]
            )
            parts.append(f'<p class="muted">{len(shown[node])} demonstrations (from train):</p><ol class="demos">{items}</ol>')
        if parts:
            blocks.append(f'<h3 data-node="{escape(node)}">{escape(node)}</h3>{"".join(parts)}')
    if not blocks:
        return ""
    return f'<section id="learned"><h2>Demonstrations and calibration</h2>{"".join(blocks)}</section>'


def _section_posteriors(run: RunRecord) -> str:
    blocks = []
    for node in _node_order(run):
        records = [r for r in run.posteriors if r.get("node") == node]
        if not records:
            continue
        last = max(r["iteration"] for r in records)
        shown = sorted((r for r in records if r["iteration"] == last), key=lambda r: r.get("example", 0))
        examples = "".join(_posterior_example(r) for r in shown[:POSTERIOR_EXAMPLES])
        blocks.append(
            f'<h3 data-node="{escape(node)}">{escape(node)} <span class="muted">(iteration {last}; '
            f"bar = posterior weight, &#10003; = chosen target)</span></h3>{examples}"
        )
    if not blocks:
        return ""
    return f'<section id="posteriors"><h2>Posterior samples of hidden nodes</h2>{"".join(blocks)}</section>'


def _section_flips(run: RunRecord) -> str:
    before = {r["index"]: r for r in run.predictions["initial"]}
    after = {r["index"]: r for r in run.predictions["best"]}
    if not before or not after:
        return ""
    rows, fixed, broken = [], 0, 0
    for index in sorted(set(before) & set(after)):
        old, new = before[index], after[index]
        if old.get("prediction") == new.get("prediction"):
            continue
        status = "fixed" if new.get("correct") and not old.get("correct") else (
            "broken" if old.get("correct") and not new.get("correct") else "changed"
        )
        fixed += status == "fixed"
        broken += status == "broken"
        rows.append(
            f'<tr class="{status}"><td class="num">{index}</td><td><pre class="input">{_text(new.get("input"))}'
            f'</pre></td><td class="value">{_text(new.get("target"))}</td>'
            f'<td class="value">{_text(old.get("prediction"))}</td>'
            f'<td class="value">{_text(new.get("prediction"))}</td>'
            f'<td><span class="badge {status}">{status}</span></td></tr>'
        )
    head = (
        f'<p class="muted">{len(rows)} of {len(after)} dev examples changed prediction between the initial '
        f"and the best prompts: {fixed} fixed, {broken} broken.</p>"
    )
    table = (
        '<table class="flips"><tr><th class="num">#</th><th>input</th><th>target</th><th>before</th>'
        f'<th>after</th><th></th></tr>{"".join(rows)}</table>'
        if rows
        else ""
    )
    return f'<section id="flips"><h2>Dev examples that changed</h2>{head}{table}</section>'


def _section_usage(run: RunRecord) -> str:
    header = "".join(f'<th class="num">{escape(f.replace("_", " "))}</th>' for f in USAGE_FIELDS)
    rows = [
        f'<tr><td class="num">{m["iteration"]}</td><td class="num">{_pct(m.get("train_acc"))}</td>'
        f'<td class="num">{_pct(m.get("dev_acc"))}</td>'
        + "".join(f'<td class="num">{_usage(f, m.get(f))}</td>' for f in USAGE_FIELDS)
        + "</tr>"
        for m in run.metrics
    ]
    totals = "".join(f'<td class="num">{_usage(f, _total(run, f))}</td>' for f in USAGE_FIELDS)
    rows.append(f'<tr class="total"><td>total</td><td></td><td></td>{totals}</tr>')
    return (
        '<section id="usage"><h2>Calls, tokens, cost and time per iteration</h2><table class="usage"><tr>'
        f'<th class="num">iteration</th><th class="num">train</th><th class="num">dev</th>{header}</tr>'
        f'{"".join(rows)}</table><p class="muted">Iteration 0 is the initial evaluation.</p></section>'
    )


def _section_spec(run: RunRecord) -> str:
    if not run.spec_text:
        return ""
    return (
        f'<section id="spec"><h2>Spec</h2><details><summary>spec.yaml</summary><pre>{escape(run.spec_text)}</pre>'
        "</details></section>"
    )


SECTIONS = (
    ("network", "Network", _section_network),
    ("curves", "Curves", _section_curves),
    ("prompts", "Prompts", _section_prompts),
    ("learned", "Demos", _section_learned),
    ("posteriors", "Posteriors", _section_posteriors),
    ("flips", "Changed predictions", _section_flips),
    ("usage", "Usage", _section_usage),
    ("spec", "Spec", _section_spec),
)


def render_page(run: RunRecord) -> str:
    bodies = [(anchor, title, build(run)) for anchor, title, build in SECTIONS]
    nav = "".join(f'<a href="#{anchor}">{escape(title)}</a>' for anchor, title, body in bodies if body)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dlngraph run: {escape(run.name)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(run.name)}</h1><div class="muted">run directory <code>{escape(run.path.name)}</code></div>'
        f"<nav>{nav}</nav>{_section_summary(run)}{''.join(body for _, _, body in bodies)}</body></html>\n"
    )
