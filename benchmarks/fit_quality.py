"""Initial vs fitted accuracy of DLN-1 and DLN-2 on several tasks, on the embedded model.

For each task and architecture: write a spec (the DLN paper's initial
instruction), `fit` it, then evaluate the spec's prompts and the best-on-dev
prompts on dev and test. Prints a table with model calls, tokens and fit wall
time, and writes the rows as JSON. Best-on-dev selection counts the initial
prompt as iteration 0, so "fitted dev" is never below "initial dev".

    python benchmarks/fit_quality.py --tasks mpqa,subj,navigate --iterations 2 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from dlngraph.api import compile_spec
from dlngraph.fitting import fit
from dlngraph.runner import evaluate, open_backends
from dlngraph.runtime.backends.base import Usage

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    # task: (data directory, labels, DLN's initial instruction)
    "mpqa": (ROOT / "specs/data/mpqa", ["negative", "positive"],
             "Read the following review, then choose whether it is negative or positive."),
    "subj": (ROOT / "specs/data/subj", ["objective", "subjective"],
             "Read the following sentence, then choose whether it is subjective or objective."),
    "navigate": (ROOT / "benchmarks/data/navigate", ["No", "Yes"],
                 "Read the following sentence, then determine whether you return to the starting point."),
    "hyperbaton": (ROOT / "benchmarks/data/hyperbaton", ["(A)", "(B)"], "Which sentence has the correct adjective order:"),
}


# The hidden layer's output continues this; after a bare "Reasoning:" the
# embedded model ends at once and every reasoning is empty.
REASONING = "Reasoning: Let's see,"


def spec_for(task: str, arch: str, args: argparse.Namespace) -> dict:
    data, labels, instruction = TASKS[task]
    answer = {
        "prompt": instruction,
        "template": "{{ prompt }}\n\n{{ input }}\n" + (f"{REASONING} {{{{ reason }}}}\n" if arch == "dln2" else "") + "Answer:",
        "output": {"type": "choice", "choices": labels},
    }
    nodes = {"answer": answer}
    if arch == "dln2":
        nodes = {
            "reason": {
                "prompt": "Think step by step about the input and write one short sentence of reasoning.",
                "template": "{{ prompt }}\n\n{{ input }}\n" + REASONING,
                "output": {"type": "text", "max_tokens": args.max_tokens, "stop": ["\n"]},
            },
            **nodes,
        }
    return {
        "name": f"{task}-{arch}",
        "data": {s: str(data / f"{s}.jsonl") for s in ("train", "dev", "test")},
        "inputs": ["input"],
        "nodes": nodes,
        "outputs": {"answer": "target"},
        "train": {
            "iterations": args.iterations,
            "batch_size": args.batch_size,
            "prompt_proposals": args.proposals,
            "posterior_samples": args.samples,
            "dev_size": args.dev,
            "patience": args.iterations,
            "proposal_max_tokens": args.proposal_tokens,
            "seed": args.seed,
        },
    }


def run_one(task: str, arch: str, args: argparse.Namespace, root: Path) -> dict:
    path = root / f"{task}-{arch}.yaml"
    path.write_text(yaml.safe_dump(spec_for(task, arch, args), sort_keys=False))
    plan = compile_spec(path)
    backends = open_backends(plan, cache_dir=root / "cache")
    started = time.perf_counter()
    result = fit(path, out=root / f"run-{task}-{arch}", plan=plan, backends=backends)
    seconds = time.perf_counter() - started
    used = Usage()
    for b in backends.values():
        used.add(b.usage)
    initial = {n: plan.spec.nodes[n].prompt for n in result.best["prompts"]}
    metrics = [json.loads(x) for x in (result.run_dir.metrics).read_text().splitlines()]
    test = {
        which: evaluate(plan, "test", prompts=prompts, limit=args.test, backends=backends).score
        for which, prompts in (("initial", initial), ("fitted", result.best["prompts"]))
    }
    return {
        "task": task,
        "arch": arch,
        "dev_initial": metrics[0]["dev_acc"],
        "dev_fitted": result.best["dev_acc"],
        "best_iteration": result.best["iteration"],
        "test_initial": test["initial"],
        "test_fitted": test["fitted"],
        "fit_calls": used.calls,
        "fit_tokens": used.prompt_tokens + used.completion_tokens,
        "fit_seconds": round(seconds, 1),
        "prompts": result.best["prompts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mpqa,subj,navigate")
    parser.add_argument("--archs", default="dln1,dln2")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--proposals", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=12, help="of the DLN-2 reasoning layer")
    parser.add_argument("--proposal-tokens", type=int, default=48, help="max tokens of a proposed prompt")
    parser.add_argument("--dev", type=int, default=16)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="fit-quality-") as tmp:
        for task in args.tasks.split(","):
            for arch in args.archs.split(","):
                rows.append(run_one(task, arch, args, Path(tmp)))
                print(f"done {task} {arch}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'prompts'})}", flush=True)
    print(f"\nsettings: iterations={args.iterations} B={args.batch_size} N={args.proposals} K={args.samples} "
          f"proposal tokens={args.proposal_tokens} dev={args.dev} test={args.test} seed={args.seed} (embedded SmolLM2-135M, CPU)")
    header = f"{'task':<11}{'arch':<6}{'dev init':>9}{'dev fit':>9}{'test init':>10}{'test fit':>9}{'calls':>7}{'tokens':>9}{'seconds':>9}"
    print(header)
    for r in rows:
        print(f"{r['task']:<11}{r['arch']:<6}{r['dev_initial']:>9.3f}{r['dev_fitted']:>9.3f}{r['test_initial']:>10.3f}"
              f"{r['test_fitted']:>9.3f}{r['fit_calls']:>7}{r['fit_tokens']:>9}{r['fit_seconds']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
