"""The catalogue of diagnostic codes: code, kebab name, explanation.

One source for `dlngraph explain CODE`, docs/errors.md and every `Diagnostic`
the compiler emits. Codes are stable: a code is never reused for another
mistake. Hundreds group by pass: E0xx file and YAML, E1xx spec shape, E2xx
names and templates, E3xx graph, E4xx backends and capabilities, E5xx data,
E6xx built-in meta-prompts. This module imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    code: str
    name: str
    summary: str
    explanation: str


_CODES = (
    Code("E001", "yaml-syntax", "The file is not valid YAML.",
         "The YAML parser stopped at the position shown. Common causes: a tab used for "
         "indentation, an unclosed quote or bracket, a value containing ': ' or ' #' "
         "without quotes. Quote such values or use a block scalar (`|`)."),
    Code("E002", "duplicate-key", "A key appears twice in the same mapping.",
         "YAML parsers silently keep the last value of a repeated key, so the first one "
         "would be ignored without a word. dlngraph rejects the file instead; remove or "
         "rename one of the two."),
    Code("E003", "file-too-large", "The spec file exceeds the size limit.",
         "A spec describes a graph, not data. Examples belong in JSONL files named under "
         "`data:`. The limit (16 MiB) leaves room for generated specs of tens of thousands "
         "of nodes."),
    Code("E004", "not-utf8", "The spec file is not UTF-8.",
         "Specs are read as UTF-8. Re-save the file in UTF-8 (most editors have an "
         "encoding option); the position shown is the first byte that does not decode."),
    Code("E005", "empty-spec", "The spec file is empty.",
         "The file holds no YAML document (it may hold only comments). Start from one of "
         "the example specs in specs/."),
    Code("E006", "not-a-mapping", "The top level of the spec is not a mapping.",
         "A spec is a mapping with keys such as `name`, `inputs`, `nodes` and `outputs`. "
         "A leading '- ' makes the whole file a list; remove it."),
    Code("E007", "file-not-found", "The spec file cannot be read.",
         "The path given to `dlngraph compile` does not exist, is not readable, or is a "
         "directory or a device rather than a file (pipes are read, up to the size limit)."),
    Code("E008", "nesting-too-deep", "Lists and mappings nest deeper than the limit.",
         "A spec nests a few levels (`nodes:` -> node -> `output:` -> `choices:`). More than "
         "64 levels is refused before the file is composed; it is usually a run of unclosed "
         "`[` or `{`, or generated input."),
    Code("E009", "too-many-values", "The spec holds more values than the limit.",
         "A spec describes a graph. More than 1,000,000 values (scalars, lists and mappings "
         "together) is refused while parsing, before they are built; a 50,000-node generated "
         "spec holds about 500,000. Examples belong in JSONL files named under `data:`."),
    Code("E010", "alias-expansion", "YAML aliases expand the spec past the limit.",
         "An alias (`*name`) stands for its anchor's whole value, and an alias inside an "
         "anchored value multiplies: nine levels of nine aliases make 387 million values from "
         "900 bytes (an alias bomb). Counted with aliases expanded, a spec may hold at most "
         "1,000,000 values and 67,108,864 characters; the position shown is the alias that "
         "passes the limit."),
    Code("E101", "unknown-key", "A key the spec format does not define.",
         "Every level of the spec accepts a fixed set of keys, so a typo is an error rather "
         "than a silently ignored setting. The message suggests the closest valid key; "
         "`dlngraph schema` prints them all."),
    Code("E102", "missing-key", "A required key is missing.",
         "The mapping shown lacks a key that has no default: for example `name`, `inputs`, "
         "`nodes` and `outputs` at the top level, or `template` and `output` in a layer."),
    Code("E103", "wrong-type", "A value has the wrong type.",
         "The value shown cannot be read as the type the key expects (a number, a string, "
         "a list, a mapping, true/false). Quote strings that look like numbers or booleans."),
    Code("E104", "invalid-value", "A value is outside what the key allows.",
         "The value has the right type but breaks a constraint: a negative count, a name "
         "with forbidden characters, an empty or duplicated `choices` list, a value not in "
         "the allowed set."),
    Code("E105", "unknown-node-kind", "A node's `kind` is not a known node kind.",
         "Node kinds are `layer` (the default: one LLM call with a learnable prompt) and "
         "`deep_thinking` (iterative forward tuning of attention K/V over demonstrations)."),
    Code("E201", "template-syntax", "A node's Jinja template does not parse.",
         "Templates are Jinja2 (`{{ variable }}`, `{% if %}`), parsed in a sandbox. The "
         "position shown is the template line where parsing stopped. Attribute access the "
         "sandbox refuses at run time (a name starting with `_`, such as `''.__class__`) is "
         "reported here too, at compile time."),
    Code("E202", "undefined-variable", "A template variable names nothing.",
         "Every template variable must be `prompt` (a layer's own learnable prompt), a "
         "dataset field listed under `inputs:`, or the name of another node (which makes an "
         "edge). A Deep-Thinking node's `demo_template` may also use `label`."),
    Code("E203", "unknown-backend", "A node or `default_backend` names a backend that is not defined.",
         "Backends are defined under `backends:` by name; a node's `backend:` (and "
         "`default_backend:`) must be one of those names. Without `backends:` the spec has "
         "one backend, `local` (the embedded torch model)."),
    Code("E204", "unused-input", "A dataset input is read by no template.",
         "Every field listed under `inputs:` must appear in at least one template; an "
         "unused input usually means a misspelt variable or a stale entry."),
    Code("E205", "unknown-output-node", "`outputs:` names a node that does not exist.",
         "Keys of `outputs:` are node names; each value is the dataset field that node's "
         "output is scored against."),
    Code("E206", "bad-node-name", "A node name cannot be used as a template variable.",
         "Node names are template variables of their children, so they must be Python "
         "identifiers and must not be `prompt`, `label` or a dataset input name."),
    Code("E207", "misplaced-variable", "A template uses a variable its slot cannot see.",
         "`prompt` belongs to layers only (a deep_thinking node has no learnable prompt), "
         "and `label` is visible only in a deep_thinking node's `demo_template`."),
    Code("E208", "prompt-unused", "A trainable layer's template does not use `{{ prompt }}`.",
         "Training changes a layer's `prompt`; if the template never shows it, training "
         "cannot change the layer's behaviour. Put `{{ prompt }}` where the instruction "
         "goes, or mark the layer `trainable: false`."),
    Code("E209", "demos-mismatch", "A layer's demonstrations and its template do not match.",
         "Demonstrations (`demos:`) are rendered into the template as `{{ demos }}`: a node "
         "with `demos:` must read `{{ demos }}`, a template reading `{{ demos }}` needs "
         "`demos:`, and drawn demonstrations need labels, so the node must be listed under "
         "`outputs:` (its target field is the label) unless fixed `examples:` are given."),
    Code("E210", "template-limit", "A template exceeds a render limit even with placeholder data.",
         "Templates render in a bounded sandbox: a value or the rendered text may hold at most "
         "1,048,576 characters, and a render may run for at most 1 s. The compiler renders each "
         "template once with one-character placeholder values; if that already passes a limit "
         "(`{{ 'a' * 100000000 }}`, nested `range(100000)` loops, a macro calling itself), every "
         "real example would too. Limits that only real data reaches are run-time errors naming the node."),
    Code("E301", "cycle", "The graph has a cycle.",
         "Edges come from template variables: a node that names another node reads its "
         "output. A network must be acyclic; the message prints the cycle path."),
    Code("E302", "reaches-no-output", "A node's output reaches no node listed in `outputs:`.",
         "Every node must contribute to a scored output, or it would be computed and "
         "trained for nothing. Use it in a downstream template, list it under `outputs:`, "
         "or remove it."),
    Code("E401", "missing-capability", "A node needs something its backend cannot do.",
         "Text layers need `generate`; choice outputs need `score` or `top_logprobs`; "
         "trainable text layers also need `score` (variational training scores "
         "continuations); deep_thinking nodes need `kv_access`, which only the torch "
         "backend has."),
    Code("E402", "unknown-backend-kind", "A backend's `kind` is neither built in nor declares its capabilities.",
         "Built-in kinds are `torch` and `litellm`. A third-party kind (registered through "
         "the `dlngraph.backends` entry point) must list its `capabilities:` in the spec so "
         "the compiler can check it without loading it."),
    Code("E403", "unknown-capability", "A backend declares a capability name that does not exist.",
         "Capabilities are `generate`, `score`, `top_logprobs` and `kv_access`."),
    Code("E404", "multi-token-choice", "A choice is several tokens on a backend that scores one token.",
         "A backend with `top_logprobs` but not `score` (e.g. a llama.cpp server, whose echoed "
         "prompt log-probs are shifted) reads each choice's log-prob from the next-token "
         "distribution, so every choice must be one token of the model. Checked at compile time "
         "when the backend names its `tokenizer`."),
    Code("E405", "proposer-cannot-generate", "`train.proposer` names a backend that cannot generate text.",
         "The proposer writes the prompt proposals and the posterior samples of every "
         "trainable layer, so it needs `generate`. Name a generating backend (a stronger "
         "model than the task's is the usual choice), or omit `proposer:`."),
    Code("E501", "data-file-missing", "A data file named under `data:` does not exist.",
         "Data paths are relative to the spec file's directory."),
    Code("E502", "data-field-missing", "A field the spec reads is absent from the data.",
         "Fields under `inputs:`, the target fields under `outputs:` and a Deep-Thinking "
         "node's `label_field` must be keys of the JSONL rows."),
    Code("E503", "data-file-invalid", "A data file is not JSONL of objects.",
         "Each line of a data file must be one JSON object mapping field names to strings. "
         "The message names the file, line and column but does not show the line: a data "
         "path may point at a file that is not data, whose content must not be printed."),
    Code("E504", "data-file-unreadable", "A data path is a directory, a device, or cannot be read.",
         "Each split under `data:` must name a regular JSONL file that dlngraph can read."),
    Code("E505", "data-not-utf8", "A data file is not UTF-8.",
         "JSON text is UTF-8. The position shown is the line and column of the first byte "
         "that does not decode; re-save the file as UTF-8. Found at compile time, so `eval`, "
         "`run` and `fit` never stop halfway on it."),
    Code("E506", "data-file-too-large", "A data file exceeds the size limit.",
         "A split is read whole into memory at run time, so a data file may hold at most "
         "256 MiB. Split the data or sample the examples to train and evaluate on."),
    Code("E507", "too-few-demonstrations", "More demonstrations are asked than the train split holds.",
         "A layer's `demos.count` demonstrations are drawn from the train split only (never "
         "dev or test, which score the network), so train must hold at least that many "
         "examples. Lower the count, add train examples, or list fixed `examples:`."),
    Code("E601", "meta-prompt-invalid", "A built-in meta-prompt template is broken.",
         "The trainer's meta-prompts (prompt proposals, posterior sampling) are checked at "
         "compile time so a broken one fails before any model call. This is a bug in "
         "dlngraph or in a local edit of dlngraph/prompts/."),
)

CODES: dict[str, Code] = {c.code: c for c in _CODES}
_BY_NAME: dict[str, Code] = {c.name: c for c in _CODES}


def name_of(code: str) -> str:
    return CODES[code].name


def lookup(code_or_name: str) -> Code | None:
    """A code by its code (any case) or its kebab name."""
    return CODES.get(code_or_name.upper()) or _BY_NAME.get(code_or_name.lower())


def markdown() -> str:
    """docs/errors.md, generated from this catalogue (a test keeps the file in sync)."""
    out = [
        "# Error codes",
        "",
        "Every mistake `dlngraph compile` finds is reported as `FILE:LINE:COL: error: MESSAGE`,",
        "followed by the source line with a caret, a `help:` hint and its code. `dlngraph explain CODE`",
        "prints the entry below; `--error-format json` gives the same fields to tools.",
        "tests/specs/bad/ holds one broken spec per mistake with the message it produces.",
        "",
        "This page is generated from `dlngraph/codes.py`: `python -m dlngraph.codes > docs/errors.md`.",
        "",
        "| code | name | meaning |",
        "|---|---|---|",
        *(f"| {c.code} | {c.name} | {c.summary} |" for c in _CODES),
    ]
    for c in _CODES:
        out += ["", f"## {c.code} {c.name}", "", f"**{c.summary}**", "", c.explanation]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
