"""Word-level diff of two prompts as HTML (<del>/<ins>), via difflib."""

from __future__ import annotations

import difflib
import re
from html import escape

# Words, runs of punctuation and whitespace: "step." -> "step", "." so a diff stays on the word.
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]+")


def word_diff(old: str, new: str) -> str:
    """`new` as escaped HTML, removed words in <del>, added words in <ins>."""
    a, b = _TOKENS.findall(old), _TOKENS.findall(new)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            out.append(f"<del>{escape(''.join(a[i1:i2]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins>{escape(''.join(b[j1:j2]))}</ins>")
        if op == "equal":
            out.append(escape("".join(a[i1:i2])))
    return "".join(out)
