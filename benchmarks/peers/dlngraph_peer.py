"""dlngraph's DLN-1 fit on the local server, through the litellm backend.

Runs in the project venv:

    python benchmarks/peers/dlngraph_peer.py --task mpqa --base-url http://127.0.0.1:PORT/v1 \
        --model smollm2 --iterations 3 --proposals 5 --batch-size 10 --dev 50 --test 100 --out r.json

Writes a one-node spec (the DLN classify template, the task's DLN instruction,
the shared subsets), evaluates it on the test subset, runs `dlngraph fit`, and
evaluates the fitted prompt. The response cache is off for every step.
`--backend torch` runs the same spec on the embedded model in-process instead
of the server: NOT like-for-like (the driver labels it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dlngraph.api import evaluate  # noqa: E402
from dlngraph.runtime.checkpoint import load_learned  # noqa: E402

from common import PROPOSAL_TOKENS, Budget, PeerResult, Task, TASKS, add_budget_args, budget_from, write_subsets  # noqa: E402


def spec_text(task: Task, budget: Budget, data: dict[str, Path], backend: dict) -> str:
    spec = {
        "version": 1,
        "name": f"peers-{task.name}",
        "backends": {"model": backend},
        "data": {split: str(path) for split, path in data.items()},
        "inputs": ["input"],
        "nodes": {
            "answer": {
                "prompt": task.instruction,
                # DLN's classify_forward:3.0 template, as the reference renders it
                "template": "{{ prompt }}\n\n{{ input }}\n\nAnswer:",
                "output": {"type": "choice", "choices": choices(task)},
            }
        },
        "outputs": {"answer": "target"},
        "metric": "accuracy",
        "train": {
            "iterations": budget.iterations,
            "batch_size": budget.batch_size,
            "prompt_proposals": budget.proposals,
            "proposal_max_tokens": PROPOSAL_TOKENS,
            "dev_size": budget.dev,
            "seed": budget.seed,
        },
    }
    return json.dumps(spec, indent=1)  # JSON is YAML


def choices(task: Task) -> list[str]:
    """The labels as the spec's choices. A BBH letter '(A)' is several tokens, which
    this server cannot score (its echo log-probs are shifted): the letter is scored."""
    return [label.strip("()") for label in task.labels] if task.letters else list(task.labels)


def subsets(task: Task, budget: Budget, directory: Path) -> dict[str, Path]:
    """The shared subsets; for letter tasks the targets become the bare letters the
    choices name (the same examples, and DLN's rule already equates '(A)' and 'A')."""
    paths = write_subsets(task.name, budget, directory)
    if task.letters:
        for path in paths.values():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            path.write_text("".join(json.dumps({**r, "target": r["target"].strip("()")}) + "\n" for r in rows),
                            encoding="utf-8")
    return paths


def backend_entry(args) -> dict:
    if args.backend == "torch":
        return {"kind": "torch"}
    return {"kind": "litellm", "model": f"openai/{args.model}", "api_base": args.base_url,
            # one server answers one request at a time: queued requests wait long on a busy CPU
            "tokenizer": "embedded", "concurrency": 8, "timeout": 600}


def test_accuracy(spec: Path, checkpoint: Path | None) -> float:
    return evaluate(spec, "test", checkpoint=checkpoint, no_cache=True).score


def fit(spec: Path, run_dir: Path) -> Path:
    """`dlngraph fit` as a user runs it; returns the best checkpoint. `--no-cache`:
    nothing is read from or written to disk; a request repeated within the run is
    sent once (as the DLN reference's in-run memo of scored contexts does)."""
    subprocess.run([sys.executable, "-m", "dlngraph", "fit", str(spec), "--out", str(run_dir), "--no-cache"], check=True)
    return run_dir / "best.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_budget_args(parser)
    parser.add_argument("--backend", default="litellm", choices=("litellm", "torch"))
    args = parser.parse_args()
    budget = budget_from(args)
    task = TASKS[args.task]
    with tempfile.TemporaryDirectory(prefix="dlngraph-peer-") as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(spec_text(task, budget, subsets(task, budget, Path(tmp) / "data"),
                                  backend_entry(args)), encoding="utf-8")
        initial = test_accuracy(spec, None)
        best = fit(spec, Path(tmp) / "run")
        final = test_accuracy(spec, best)
        prompt = load_learned(best)["prompts"]["answer"]
        # the run directory (metrics, checkpoints, predictions) stays beside the result
        shutil.copytree(Path(tmp) / "run", args.out.with_suffix(".run"), dirs_exist_ok=True)
    suffix = "" if args.backend == "litellm" else " (torch backend, not like-for-like)"
    PeerResult(system="dlngraph" + suffix, task=task.name, initial_test_acc=initial, final_test_acc=final,
               final_prompt=prompt).write(args.out)


if __name__ == "__main__":
    main()
