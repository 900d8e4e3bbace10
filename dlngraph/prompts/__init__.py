"""The trainer's built-in meta-prompts, as jinja files beside this module.

`TEMPLATES` maps each file name to the variables it may read; the compiler's
meta-prompt pass checks every template against it at compile time, so a broken
edit fails `dlngraph compile`, not the middle of a fit. `load(name)` returns
the template text. Reading a file is the only thing this module does.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

# proposal: a DLN-1 step. `prompt` is the current instruction; `successes` and
# `failures` are lists of {"input", "output", "target"} from the mini-batch;
# `directive` says which kind of edit this proposal should make.
# posterior: a hidden node's posterior sample. `prompt` is its instruction,
# `input` what it read, `output` what it wrote, `targets` a list of
# {"node", "target"}: what each child node should produce; `forward` the node's
# own rendered template, last, so a sample continues it in the form a forward
# output has (after a bare heading the small model wrote nothing).
TEMPLATES: dict[str, frozenset[str]] = {
    "posterior.jinja": frozenset({"prompt", "input", "output", "targets", "forward"}),
    "proposal.jinja": frozenset({"prompt", "successes", "failures", "directive"}),
}


@cache
def load(name: str) -> str:
    if name not in TEMPLATES:
        raise KeyError(f"no built-in meta-prompt {name!r}; there are {', '.join(sorted(TEMPLATES))}")
    return (Path(__file__).parent / name).read_text(encoding="utf-8")
