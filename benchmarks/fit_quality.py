"""What each learnable part buys, on the embedded model: test accuracy per task and column.

DLN-1 columns, each a spec variant of the same task (the DLN paper's initial
instruction) fitted with the same budget and seed:

- initial: the instruction alone (no demonstrations, no calibration, no fit);
- calib: batch calibration only (the label prior estimated on unlabeled train
  inputs; no search);
- demos: k demonstrations drawn from train and searched (redraw, bootstrap,
  swap), no instruction proposals, no calibration;
- instr: instruction search only (DLN-1 proposals; no demonstrations, no calibration);
- all: demonstrations, calibration and instruction search together.

DLN-2 (a hidden reasoning layer feeding the answer layer): initial and all.

Every fitted column is run for each seed (the seed draws batches, demonstrations
and the calibration inputs); the table gives the 3-seed mean test accuracy with
its spread (min-max), the dev accuracy, and a McNemar exact test of the fitted
column against `initial` on the same test examples (per seed; the table shows
the largest p of the seeds, and how many seeds have p < 0.05). Calls, tokens
and seconds are per fit, from the fit's own metrics.jsonl. mpqa and subj inputs
are shown without their "Options:" lines (the label words are the choices; see
../shared/OPTIMIZERS.md); BBH inputs keep them (they list the answers).

Rows are appended to --json after every fit, and the table is printed (and
written to --table) after every task, so a run cut short still reports.

    nice -n 10 python benchmarks/fit_quality.py --tasks mpqa,subj --seeds 1,2,3 --table fit_quality.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dlngraph.api import compile_spec, evaluate, fit
from dlngraph.runtime.backends.registry import open_backends

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks/data"
TASKS = {
    # task: (data directory, labels, DLN's initial instruction, cut "Options:" lines)
    "mpqa": (ROOT / "specs/data/mpqa", ["negative", "positive"],
             "Read the following review, then choose whether it is negative or positive.", True),
    "subj": (ROOT / "specs/data/subj", ["objective", "subjective"],
             "Read the following sentence, then choose whether it is subjective or objective.", True),
    "navigate": (DATA / "navigate", ["No", "Yes"],
                 "Read the following sentence, then determine whether you return to the starting point.", False),
    "hyperbaton": (DATA / "hyperbaton", ["(A)", "(B)"], "Which sentence has the correct adjective order:", False),
    "date_understanding": (DATA / "date_understanding", ["(A)", "(B)", "(C)", "(D)", "(E)", "(F)"],
                           "Infer the date from context.", False),
    "sports_understanding": (DATA / "sports_understanding", ["no", "yes"],
                             "Determine whether the sentence is plausible.", False),
}  # fmt: skip
DLN1 = ("initial", "calib", "demos", "instr", "all")
DLN2 = ("initial", "all")

# The hidden layer's output continues this; after a bare "Reasoning:" the
# embedded model ends at once and every reasoning is empty.
REASONING = "Reasoning: Let's see,"


def spec_for(task: str, arch: str, column: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    data, labels, instruction, cut = TASKS[task]
    shown = "{{ input.split('\\nOptions:')[0] }}" if cut else "{{ input }}"
    with_demos = column in ("demos", "all")
    reasoning = f"{REASONING} {{{{ reason }}}}\n" if arch == "dln2" else ""
    answer: dict[str, Any] = {
        "prompt": instruction,
        "template": "{{ prompt }}\n\n" + ("{{ demos }}\n\n" if with_demos else "") + shown + "\n" + reasoning + "Answer:",
        "output": {"type": "choice", "choices": labels},
    }
    if with_demos:
        answer["demos"] = {"count": args.demos, "template": shown + "\nAnswer: {{ label }}"}
    if column in ("calib", "all"):
        answer["calibration"] = "batch"
    nodes = {"answer": answer}
    if arch == "dln2":
        nodes = {
            "reason": {
                "prompt": "Think step by step about the input and write one short sentence of reasoning.",
                "template": "{{ prompt }}\n\n" + shown + "\n" + REASONING,
                "output": {"type": "text", "max_tokens": args.max_tokens, "stop": ["\n"]},
            },
            **nodes,
        }
    searches_instruction = column in ("instr", "all")
    return {
        "name": f"{task}-{arch}-{column}",
        "data": {s: str(data / f"{s}.jsonl") for s in ("train", "dev", "test")},
        "inputs": ["input"],
        "nodes": nodes,
        "outputs": {"answer": "target"},
        "train": {
            "iterations": 0 if column == "calib" else args.iterations,
            "batch_size": args.batch_size,
            "prompt_proposals": args.proposals if searches_instruction else 1,
            "posterior_samples": args.samples,
            "dev_size": args.dev,
            "patience": args.iterations,
            "proposal_max_tokens": args.proposal_tokens,
            "calibration_size": args.calibration,
            "seed": seed,
        },
    }


def mcnemar(initial: list[bool], fitted: list[bool]) -> float:
    """Exact two-sided McNemar p-value of paired correctness (binomial on the discordant pairs)."""
    b = sum(i and not f for i, f in zip(initial, fitted))
    c = sum(f and not i for i, f in zip(initial, fitted))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def run_one(task: str, arch: str, column: str, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    path = root / f"{task}-{arch}-{column}-{seed}.yaml"
    path.write_text(yaml.safe_dump(spec_for(task, arch, column, seed, args), sort_keys=False))
    plan = compile_spec(path)
    backends = open_backends(plan, cache_dir=args.cache)
    row: dict[str, Any] = {"task": task, "arch": arch, "column": column, "seed": seed}
    checkpoint = None
    if column != "initial":
        started = time.perf_counter()
        result = fit(plan, out=root / f"run-{path.stem}", backends=backends)
        metrics = [json.loads(x) for x in result.run_dir.metrics.read_text().splitlines()]
        checkpoint = result.run_dir.best
        row.update(
            dev_initial=metrics[0]["dev_acc"],
            dev=result.best["dev_acc"],
            best_iteration=result.best["iteration"],
            fit_calls=sum(m["calls"] for m in metrics),
            fit_tokens=sum(m["prompt_tokens"] + m["completion_tokens"] for m in metrics),
            fit_seconds=round(time.perf_counter() - started, 1),
            prompts=result.best["prompts"],
        )
    out = root / f"test-{path.stem}.jsonl"
    scored = evaluate(plan, "test", checkpoint=checkpoint, limit=args.test, backends=backends, out=out, force=True)
    row["test"] = scored.score
    row["correct"] = [json.loads(x)["correct"] for x in out.read_text().splitlines()]
    for b in backends.values():
        b.close()
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"settings: iterations={args.iterations} B={args.batch_size} N={args.proposals} demos k={args.demos} "
        f"dev={args.dev} calibration inputs={args.calibration} test<={args.test} seeds={args.seeds} "
        "(embedded SmolLM2-135M, CPU)",
        "",
        "| task | arch | column | test mean (min-max) | dev mean | McNemar vs initial: max p (seeds p<0.05) "
        "| calls/fit | tokens/fit | s/fit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    initial = {(r["task"], r["arch"]): r for r in rows if r["column"] == "initial"}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["arch"], r["column"]), []).append(r)
    for (task, arch, column), group in groups.items():
        tests = [r["test"] for r in group]
        cell = f"{statistics.mean(tests):.3f} ({min(tests):.3f}-{max(tests):.3f})" if len(tests) > 1 else f"{tests[0]:.3f}"
        base = initial.get((task, arch))
        if column == "initial" or base is None:
            lines.append(f"| {task} | {arch} | {column} | {cell} | | | | | |")
            continue
        ps = [mcnemar(base["correct"], r["correct"]) for r in group]
        dev = statistics.mean(r["dev"] for r in group)
        mean = lambda k: statistics.mean(r[k] for r in group)  # noqa: E731
        lines.append(
            f"| {task} | {arch} | {column} | {cell} | {dev:.3f} | {max(ps):.3g} ({sum(p < 0.05 for p in ps)}/{len(ps)}) "
            f"| {mean('fit_calls'):.0f} | {mean('fit_tokens'):.0f} | {mean('fit_seconds'):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--archs", default="dln1,dln2")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--proposals", type=int, default=2, help="N: candidates per step incl. the current prompt")
    parser.add_argument("--demos", type=int, default=4, help="k demonstrations")
    parser.add_argument("--samples", type=int, default=2, help="K posterior samples (DLN-2)")
    parser.add_argument("--max-tokens", type=int, default=12, help="of the DLN-2 reasoning layer")
    parser.add_argument("--proposal-tokens", type=int, default=32, help="max tokens of a proposed prompt")
    parser.add_argument("--dev", type=int, default=24)
    parser.add_argument("--calibration", type=int, default=16, help="unlabeled train inputs for batch calibration")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=None, help="response cache directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here after every fit")
    parser.add_argument("--table", type=Path, default=None, help="write the table here after every task")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="fit-quality-") as tmp:
        root = Path(tmp)
        args.cache = args.cache or root / "cache"
        for task in args.tasks.split(","):
            for arch in args.archs.split(","):
                for column in DLN1 if arch == "dln1" else DLN2:
                    for seed in seeds[:1] if column == "initial" else seeds:
                        rows.append(run_one(task, arch, column, seed, args, root))
                        brief = {k: v for k, v in rows[-1].items() if k not in ("prompts", "correct")}
                        print(f"done {json.dumps(brief)}", flush=True)
                        if args.json:
                            args.json.write_text(json.dumps(rows, indent=1) + "\n")
            text = table(rows, args)
            print(text, flush=True)
            if args.table:
                args.table.write_text(text)


if __name__ == "__main__":
    main()
