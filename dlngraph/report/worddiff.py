"""Word-level diff of two prompts as HTML (<del>/<ins>), via difflib."""

from __future__ import annotations

import difflib
import re
from html import escape

# Words, runs of punctuation and whitespace: "step." -> "step", "." so a diff stays on the word.
_TOKENS = re.compile(r"\w+|[^\w\s]+|\s+")
# Below this similarity a word diff is noise: show the prompt as replaced whole.
MIN_RATIO = 0.4


def _segments(a: list[str], b: list[str]) -> list[tuple[str, str, str]]:
    """(kind, old, new) runs, kind "equal" or "change"; a change absorbs the lone spaces
    between two changes, so "a b" -> "x y" reads as one replaced phrase, not two words."""
    out: list[tuple[str, str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        old, new = "".join(a[i1:i2]), "".join(b[j1:j2])
        kind = "equal" if op == "equal" else "change"
        lone_space = len(out) >= 2 and out[-1][0] == "equal" and not out[-1][1].strip()
        if kind == "change" and lone_space and out[-2][0] == "change":
            space = out.pop()[1]
            _, old0, new0 = out.pop()
            old, new = old0 + space + old, new0 + space + new
        out.append((kind, old, new))
    return out


def word_diff(old: str, new: str) -> str:
    """`new` as escaped HTML, removed words in <del>, added words in <ins>."""
    a, b = _TOKENS.findall(old), _TOKENS.findall(new)
    words_a, words_b = [t for t in a if t.strip()], [t for t in b if t.strip()]
    if old and new and difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False).ratio() < MIN_RATIO:
        return f"<del>{escape(old)}</del> <ins>{escape(new)}</ins>"
    html = []
    for kind, before, after in _segments(a, b):
        if kind == "equal":
            html.append(escape(before))
            continue
        html += [f"<del>{escape(before)}</del>"] if before else []
        html += [f"<ins>{escape(after)}</ins>"] if after else []
    return "".join(html)
