"""Side by side: dlngraph, the DLN reference code and DSPy on one local server.

Starts one llama.cpp server (tests/servers.py) serving the embedded SmolLM2
GGUF on 127.0.0.1 and a counting proxy in front of it, then runs each system,
one at a time, as a subprocess in its own venv against the proxy, and prints
one table: initial/final test accuracy, model calls, prompt and completion
tokens (as the server reports them), wall seconds, and dlngraph's ratios.

    bash benchmarks/peers/setup_peers.sh                      # once: peers' venvs
    python benchmarks/peers/driver.py --tasks mpqa --dln-src /work/peers/dln \
        --iterations 3 --proposals 5 --batch-size 10 --dev 50 --test 100

Each system's wall time covers its whole run: initial test evaluation, the fit
and the final test evaluation, process start included.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
from common import TASKS, Budget, PeerResult  # noqa: E402
from server import CountingProxy, Usage  # noqa: E402

log = logging.getLogger("peers")
SYSTEMS = ("dlngraph", "dln-reference", "dspy-copro", "dspy-miprov2")


@dataclass
class Row:
    system: str
    task: str
    initial: float | None
    final: float | None
    calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    status: str  # "ok" or why it failed
    final_prompt: str = ""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def peer_command(system: str, args: argparse.Namespace, python: dict[str, str], model: dict[str, str]) -> list[str]:
    if system.startswith("dlngraph"):
        return [python["dlngraph"], str(HERE / "dlngraph_peer.py"), "--backend", args.dlngraph_backend]
    if system == "dln-reference":
        return [python["dln"], str(HERE / "dln_reference.py"), "--dln-src", str(args.dln_src),
                "--tokenizer", model["tokenizer"]]
    optimizer = system.removeprefix("dspy-")
    return [python["dspy"], str(HERE / "dspy_peer.py"), "--optimizer", optimizer, "--adapter", args.dspy_adapter]


def run_one(system: str, task: str, args, budget: Budget, proxy: CountingProxy, python, model, stem: Path) -> Row:
    """One system on one task; its result and output go to `stem`.json and `stem`.log."""
    out, output_log = stem.with_suffix(".json"), stem.with_suffix(".log")
    name = model["gguf"] if system == "dln-reference" else model["alias"]
    command = [*peer_command(system, args, python, model), "--task", task, "--base-url", f"{proxy.url}/v1",
               "--model", name, "--out", str(out), *budget.as_args()]
    log.info("running %s", " ".join(command))
    proxy.take()
    started = time.monotonic()
    with output_log.open("w") as output:
        try:
            code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:  # its row says so; the other systems still run
            code = None
    seconds = time.monotonic() - started
    usage: Usage = proxy.take()
    if code != 0 or not out.is_file():
        tail = output_log.read_text(errors="replace").strip().splitlines()[-1:]
        why = f"stopped after the {args.timeout:.0f} s limit" if code is None else f"failed (exit {code})"
        return Row(system, task, None, None, usage.calls, usage.prompt_tokens, usage.completion_tokens,
                   seconds, f"{why}: {' '.join(tail)[:160]}")
    result = PeerResult.read(out)
    return Row(result.system, task, result.initial_test_acc, result.final_test_acc, usage.calls,
               usage.prompt_tokens, usage.completion_tokens, seconds,
               "ok" if not usage.errors else f"ok, {usage.errors} HTTP errors", result.final_prompt)


def fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def ratio(peer: float, ours: float) -> str:
    return f"{peer / ours:.2f}x" if ours else "-"


def table(rows: list[Row]) -> str:
    lines = [
        "| system | task | test acc initial | test acc final | calls | prompt tok | completion tok | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.system} | {r.task} | {fmt_acc(r.initial)} | {fmt_acc(r.final)} | {r.calls} | "
                     f"{r.prompt_tokens} | {r.completion_tokens} | {r.seconds:.0f} | {r.status} |")
    lines += ["", "dlngraph vs each peer (peer / dlngraph: above 1x means dlngraph used less; "
              "accuracy difference in points, dlngraph minus peer):", "",
              "| task | peer | calls | tokens | wall s | final acc diff |", "|---|---|---|---|---|---|"]
    for ours in (r for r in rows if r.system.startswith("dlngraph") and r.final is not None):
        for peer in (r for r in rows if r.task == ours.task and not r.system.startswith("dlngraph")):
            diff = "-" if peer.final is None else f"{100 * (ours.final - peer.final):+.1f}"
            lines.append(f"| {ours.task} | {peer.system} | {ratio(peer.calls, ours.calls)} | "
                         f"{ratio(peer.tokens, ours.tokens)} | {ratio(peer.seconds, ours.seconds)} | {diff} |")
    return "\n".join(lines)


def model_files() -> dict[str, str]:
    from dlngraph.runtime.models import ModelSource, embedded_gguf_path, model_directory
    from tests.servers import MODEL_ALIAS

    return {"gguf": str(embedded_gguf_path()), "alias": MODEL_ALIAS,
            "tokenizer": str(model_directory(ModelSource.resolve("embedded")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="mpqa", help="comma-separated: " + ",".join(TASKS))
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, in run order, from {', '.join(SYSTEMS)}")
    for name in ("iterations", "proposals", "batch-size", "dev", "test", "seed"):
        parser.add_argument(f"--{name}", type=int, required=name != "seed" and "--merge" not in sys.argv, default=42)
    parser.add_argument("--dln-src", type=Path, default=Path("/work/peers/dln"))
    parser.add_argument("--peers-venv", type=Path, default=Path("/work/peers-venv"))
    parser.add_argument("--dspy-adapter", default="lenient", choices=("chat", "lenient"))
    parser.add_argument("--dlngraph-backend", default="litellm", choices=("litellm", "torch"))
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp server threads")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per system run")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep logs, results.json and table.md here")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="OUT_DIR",
                        help="print one table from the results.json of earlier runs (e.g. lanes run side by side)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    budget = Budget(args.iterations, args.proposals, args.batch_size, args.dev, args.test, args.seed)
    python = {"dlngraph": sys.executable, "dln": str(args.peers_venv / "dln" / "bin" / "python"),
              "dspy": str(args.peers_venv / "dspy" / "bin" / "python")}
    from tests.servers import LlamaServer

    if args.merge:
        print(table([Row(**row) for d in args.merge for row in json.loads((d / "results.json").read_text())]))
        return
    workdir = args.out_dir or Path(tempfile.mkdtemp(prefix="peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with LlamaServer(workdir, threads=args.threads) as llama, CountingProxy(f"http://127.0.0.1:{llama.port}") as proxy:
        model = model_files()
        for task in args.tasks.split(","):
            for position, system in enumerate(args.systems.split(",")):
                stem = workdir / f"{task}-{position}-{system}"  # a system may run twice (repeatability)
                rows.append(run_one(system, task, args, budget, proxy, python, model, stem))
                log.info("%s", rows[-1])
                # after every system, so an interrupted driver keeps what it measured
                (workdir / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1), encoding="utf-8")
    finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"{finished}: `python benchmarks/peers/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`\n\n"
            f"budget: {asdict(budget)}\n\n{table(rows)}\n")
    (workdir / "table.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"logs and results: {workdir}")


if __name__ == "__main__":
    main()
