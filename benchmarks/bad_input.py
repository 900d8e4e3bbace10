"""Adversarial inputs: each must end with a clear error in under 2 s and 300 MB.

Every case runs as its own subprocess: `dlngraph compile FILE` for specs,
data and templates (the compiler renders a template once with placeholder
values), and a `python -c` that renders one template through
`dlngraph.runtime.template.render`, the run-time path, for template bombs. The big files
are generated in a temporary folder. Printed per case, side by side with the
valid baselines measured in the same run: exit status, wall-clock and CPU
seconds, peak RSS of that process (`os.wait4`), their ratios to the baseline,
and the first line of stderr. A child's peak RSS starts at this process's RSS
when it forks, so the big files are written in pieces and this process stays
smaller than any child. The verdict uses CPU seconds: on a shared machine,
wall-clock time includes waiting for a core (the load average is printed).

    python benchmarks/bad_input.py [--only alias-bomb,flow-list]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DLNGRAPH = Path(sys.executable).parent / "dlngraph"
BAD = ROOT / "tests" / "specs" / "bad"
TARGET_SECONDS, TARGET_MB = 2.0, 300.0

LAYER = "nodes: {{a: {{template: '{{{{ prompt }}}} {{{{ input }}}}', output: {{type: text}}}}}}\noutputs: {{a: target}}\n"


@dataclass(frozen=True)
class Result:
    code: int
    seconds: float
    cpu: float
    peak_mb: float
    first_line: str


def run(argv: list[str]) -> Result:
    """Run `argv`, returning its exit status, wall time and its own peak RSS."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        first = err.read(4096).decode("utf-8", "replace").splitlines()[:1]
    cpu = usage.ru_utime + usage.ru_stime
    return Result(process.returncode, seconds, cpu, usage.ru_maxrss / 1024, first[0] if first else "")


def spec_with(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(body)
    return path


def alias_bomb(levels: int) -> str:
    lines = ["name: bomb", "inputs: [input]", "nodes:", "  answer:", "    template: '{{ prompt }} {{ input }}'",
             "    output:", "      type: choice", "      choices:",
             "        - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]  # fmt: skip
    lines += [f"        - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, "outputs: {answer: target}", ""])


def one_line(mistake: str, nodes: int = 2000) -> str:
    """A one-line spec of `nodes` nodes with one mistake each (~300 KB)."""
    pad = "x" * 60
    each = {
        "typo": "n{k}: {{template: '{{{{ prompt }}}} {{{{ input }}}} {pad}', output: {{type: text}}, promtp: x{k}}}",
        "undefined": "n{k}: {{template: '{{{{ prompt }}}} {{{{ input }}}} {{{{ m{k} }}}} {pad}', output: {{type: text}}}}",
    }[mistake]
    body = ", ".join(each.format(k=k, pad=pad) for k in range(nodes))
    return f"{{name: typos, inputs: [input], nodes: {{{body}}}, outputs: {{n0: target}}}}\n"


def data_spec(tmp: Path, name: str, test: Path | str) -> Path:
    tiny = BAD / "data" / "tiny.jsonl"
    return spec_with(tmp, name, f"name: d\ndata: {{train: {tiny}, test: {test}}}\ninputs: [input]\n" + LAYER.format())


def render_case(template: str) -> list[str]:
    code = (
        "import sys\nfrom dlngraph.errors import RuntimeFailure\nfrom dlngraph.runtime.template import render\n"
        f"try:\n    render({template!r}, 'P', {{'input': 'x'}}, node='n')\n"
        "except RuntimeFailure as exc:\n    print(exc, file=sys.stderr); sys.exit(2)\n"
    )
    return [sys.executable, "-c", code]


def cases(tmp: Path) -> dict[str, tuple[str, Callable[[], list[str]]]]:
    """name -> (baseline name, a function making the argv); files are made when a case runs."""

    def compile_(make: Callable[[], Path | str]) -> Callable[[], list[str]]:
        return lambda: [str(DLNGRAPH), "compile", str(make())]

    def sparse_data() -> Path:
        from dlngraph.compiler.data_checks import MAX_DATA_BYTES

        huge = tmp / "huge.jsonl"
        with huge.open("wb") as f:
            f.truncate(MAX_DATA_BYTES + 1)
        return data_spec(tmp, "huge-data", huge)

    def flow_list() -> Path:
        path = tmp / "flow.yaml"
        with path.open("w") as f:
            f.write("name: f\ninputs: [x")
            for _ in range(5_000):
                f.write(", x" * 1_000)
            f.write("]\n")
        return path

    def lines(name: str, head: str, line: str, count: int) -> Callable[[], Path]:
        def make() -> Path:
            path = tmp / f"{name}.yaml"
            with path.open("w") as f:
                f.write(head)
                for start in range(0, count, 1_000):
                    f.write("".join(line.format(i=i) for i in range(start, min(count, start + 1_000))))
            return path

        return make

    secret = Path("/etc/shadow") if os.access("/etc/shadow", os.R_OK) else Path("/etc/passwd")
    return {
        "valid spec (baseline)": ("", compile_(lambda: ROOT / "specs" / "dln1-mpqa.yaml")),
        "alias bomb, 9 levels": ("valid spec (baseline)", compile_(lambda: BAD / "alias-bomb.yaml")),
        "alias bomb, 10 levels": ("valid spec (baseline)", compile_(lambda: spec_with(tmp, "bomb10", alias_bomb(10)))),
        "2,000 typos, one line": ("valid spec (baseline)", compile_(lambda: spec_with(tmp, "typos", one_line("typo")))),
        "2,000 undefined vars, one line": (
            "valid spec (baseline)", compile_(lambda: spec_with(tmp, "undefined", one_line("undefined")))
        ),
        "/dev/zero": ("valid spec (baseline)", compile_(lambda: "/dev/zero")),
        "flow list of 5M inputs (15 MB)": ("valid spec (baseline)", compile_(flow_list)),
        "400,000 unknown keys (4 MB)": (
            "valid spec (baseline)", compile_(lines("keys", "name: k\n", "k{i}: 1\n", 400_000))
        ),
        "999,990 values (under the limit)": (
            "valid spec (baseline)", compile_(lines("values", "name: k\ninputs:\n", "- x\n", 999_990))
        ),
        "nesting 10,000 deep": (
            "valid spec (baseline)", compile_(lambda: spec_with(tmp, "deep", "name: d\nx: " + "[" * 10_000 + "]" * 10_000))
        ),
        "template attribute escape": ("valid spec (baseline)", compile_(lambda: BAD / "template-attribute-escape.yaml")),
        "template 'a' * 100000000": ("valid spec (baseline)", compile_(lambda: BAD / "template-too-large.yaml")),
        "template nested range(100000) loops": (
            "valid spec (baseline)", compile_(lambda: BAD / "template-loops-forever.yaml")
        ),
        "data not UTF-8": ("valid spec (baseline)", compile_(lambda: BAD / "data-not-utf8.yaml")),
        f"data is {secret}": ("valid spec (baseline)", compile_(lambda: data_spec(tmp, "secret", secret))),
        "data is a directory": ("valid spec (baseline)", compile_(lambda: BAD / "data-is-a-directory.yaml")),
        "data over the size limit (sparse)": ("valid spec (baseline)", compile_(sparse_data)),
        "render: valid template (baseline)": ("", lambda: render_case("{{ prompt }}: {{ input }}")),
        "render: 'a' * 100000000": ("render: valid template (baseline)", lambda: render_case("{{ 'a' * 100000000 }}")),
        "render: nested range(100000) loops": (
            "render: valid template (baseline)",
            lambda: render_case("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
        ),
        "render: macro recursion": (
            "render: valid template (baseline)", lambda: render_case("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")
        ),
        "render: doubling ~ in a loop": (
            "render: valid template (baseline)",
            lambda: render_case(
                "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
            ),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    args = parser.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        table = cases(Path(tmp))
        print(
            f"{'case':<36} {'exit':>4} {'wall s':>7} {'CPU s':>6} {'x base':>7} {'peak MB':>8} {'x base':>7}"
            "  first line of stderr"
        )
        for name, (baseline, argv) in table.items():
            if wanted and not baseline == "" and not any(w in name for w in wanted):
                continue
            result = results[name] = run(argv())
            base = results.get(baseline)
            ratio_s = f"{result.cpu / base.cpu:7.2f}" if base else f"{'':>7}"
            ratio_m = f"{result.peak_mb / base.peak_mb:7.2f}" if base else f"{'':>7}"
            within = result.cpu < TARGET_SECONDS and result.peak_mb < TARGET_MB
            flag = "" if within or not baseline else "  OVER TARGET"
            print(
                f"{name:<36} {result.code:>4} {result.seconds:7.2f} {result.cpu:6.2f} {ratio_s}"
                f" {result.peak_mb:8.1f} {ratio_m}  "
                f"{result.first_line[:110]}{flag}",
                flush=True,
            )
    adversarial = {n: r for n, r in results.items() if "baseline" not in n}
    bad = [n for n, r in adversarial.items() if r.code != 2 or r.cpu >= TARGET_SECONDS or r.peak_mb >= TARGET_MB]
    print(
        f"{len(adversarial) - len(bad)}/{len(adversarial)} adversarial cases exit 2 within "
        f"{TARGET_SECONDS:g} CPU s and {TARGET_MB:g} MB" + (f"; not: {', '.join(bad)}" if bad else "")
    )
    print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall s includes waiting)")


if __name__ == "__main__":
    main()
