"""What every peer script shares: tasks, data subsets, accuracy, the result file.

Standard library only: the peer scripts import this from their own virtual
environments (the DLN reference pins an old openai client), so nothing here may
need the project's dependencies. The server and the counting proxy live in
`server.py`, which only the driver (project venv) imports.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# mpqa/subj ship with the example specs; the BBH tasks were copied for the benchmark.
DATA_ROOTS = (REPO / "specs" / "data", REPO / "benchmarks" / "data")
PROPOSAL_TOKENS = 128  # cap on a proposed prompt's length, the same for every system


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    instruction: str  # DLN's initial instruction (../shared/data/README.md)
    letters: bool = False  # BBH multiple choice: '(A)', 'A' and 'a' all match '(A)'


TASKS = {
    t.name: t
    for t in (
        Task("mpqa", ("negative", "positive"),
             "Read the following review, then choose whether it is negative or positive."),
        Task("subj", ("objective", "subjective"),
             "Read the following sentence, then choose whether it is subjective or objective."),
        Task("hyperbaton", ("(A)", "(B)"),
             "Which sentence has the correct adjective order:", letters=True),
        Task("navigate", ("No", "Yes"),
             "Read the following sentence, then determine whether you return to the starting point."),
    )
}


@dataclass(frozen=True)
class Budget:
    """The knobs matched across systems (each maps them as closely as it allows)."""

    iterations: int
    proposals: int
    batch_size: int
    dev: int  # first N dev lines: the selection set
    test: int  # first N test lines: reported accuracy
    seed: int = 42

    def as_args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]


def add_budget_args(parser) -> None:  # an argparse.ArgumentParser
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible /v1 URL (the proxy)")
    parser.add_argument("--model", required=True, help="model name the server answers to")
    parser.add_argument("--out", required=True, type=Path, help="result JSON written here")
    for name in ("iterations", "proposals", "batch-size", "dev", "test", "seed"):
        parser.add_argument(f"--{name}", type=int, required=name != "seed", default=42)


def budget_from(args) -> Budget:
    return Budget(args.iterations, args.proposals, args.batch_size, args.dev, args.test, args.seed)


def data_dir(task: str) -> Path:
    for root in DATA_ROOTS:
        if (root / task / "test.jsonl").is_file():
            return root / task
    raise FileNotFoundError(f"no data for {task} under {[str(r) for r in DATA_ROOTS]}")


def load_split(task: str, split: str, limit: int | None = None) -> list[dict]:
    """The first `limit` lines of a split: every system sees exactly these examples."""
    lines = (data_dir(task) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return rows[:limit] if limit else rows


def write_subsets(task: str, budget: Budget, directory: Path) -> dict[str, Path]:
    """train (all), dev and test (first N lines) as JSONL files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"train": None, "dev": budget.dev, "test": budget.test}
    paths = {}
    for split, limit in sizes.items():
        paths[split] = directory / f"{split}.jsonl"
        rows = load_split(task, split, limit)
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def normalize(task: Task, text: str) -> str:
    """The label a reply names: its first word, letters reduced for BBH (DLN's rule)."""
    words = re.sub(r"[^\w()]+", " ", text).split()
    if not words:
        return ""
    word = words[1] if words[0].lower() == "option" and len(words) > 1 else words[0]
    return word.strip("()").lower() if task.letters else word.lower()


def correct(task: Task, prediction: str, target: str) -> bool:
    return normalize(task, prediction) == normalize(task, target)


@dataclass
class PeerResult:
    """What a peer script writes to --out; the driver adds calls, tokens and seconds."""

    system: str
    task: str
    initial_test_acc: float | None
    final_test_acc: float | None
    final_prompt: str = ""
    notes: list[str] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "PeerResult":
        return cls(**json.loads(path.read_text(encoding="utf-8")))
