"""Rendering node templates: sandboxed jinja with StrictUndefined, within bounds.

Rendering goes through `dlngraph.sandbox`, which bounds a render's size and
time; any failure (a limit, an undefined variable, the template's own error)
is a `RuntimeFailure` naming the node.

A template sees `prompt` (the node's learnable parameter), `demos` (its
rendered demonstrations, also learned; like the prompt, shared by every
example), the dataset inputs and the outputs of its parent nodes. `split_shared` cuts a rendering into the
part every example of a batch shares (everything before the first per-example
variable, typically the instruction) and the rest, which becomes
`ScoreRequest.prefix` / `ScoreRequest.prompt` so backends can reuse the KV cache
of the shared part.
"""

from __future__ import annotations

from collections.abc import Mapping

import jinja2

from dlngraph import sandbox
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import ScoreRequest

_SENTINEL = "\x00\x1f\x00"  # no letters: case filters leave it intact


def render(template: str, prompt: str, row: Mapping[str, str], *, node: str | None = None, demos: str = "") -> str:
    """The text a node sends for one example (`demos`: its rendered demonstrations)."""
    try:
        return sandbox.render(template, {**row, "prompt": prompt, "demos": demos})
    except jinja2.TemplateError as exc:
        raise RuntimeFailure(f"template could not be rendered: {exc}", node=node) from exc


def split_shared(
    template: str, prompt: str, row: Mapping[str, str], *, node: str | None = None, demos: str = ""
) -> tuple[str, str]:
    """(shared prefix, per-example rest) of `render(template, prompt, row)`.

    The shared prefix is what renders before the first per-example variable
    (found by rendering with sentinels). If a filter or condition hides the
    sentinel, or the real text does not start with it, nothing is shared.
    """
    text = render(template, prompt, row, node=node, demos=demos)
    try:
        probe = sandbox.render(template, {**{k: _SENTINEL for k in row}, "prompt": prompt, "demos": demos})
    except jinja2.TemplateError:
        return "", text
    at = probe.find(_SENTINEL)
    shared = probe if at < 0 else probe[:at]
    if at < 0 or not text.startswith(shared):
        return "", text
    return shared, text[len(shared) :]


def score_request(
    template: str, prompt: str, row: Mapping[str, str], target: str, *, node: str | None = None, demos: str = ""
) -> ScoreRequest:
    """The request scoring `target` after the rendered template, instruction as prefix.

    The target follows the rendered text after one space, unless the text
    already ends in whitespace (lm-evaluation-harness's target delimiter).
    """
    shared, rest = split_shared(template, prompt, row, node=node, demos=demos)
    text = shared + rest
    gap = "" if not text or text[-1].isspace() else " "
    return ScoreRequest(prompt=rest, continuation=gap + target, prefix=shared)
