"""A litellm endpoint that accepts connections and never answers: how long
`dlngraph compile`, `compile --probe` and `dlngraph run` take to end.

The server is a socket on 127.0.0.1 that accepts and then sleeps. The spec's
backend has `timeout: T` and `max_retries: 3`, no declared capabilities, and
names an API-key variable (set for the run). Each command runs as its own
subprocess; printed per command: exit status, seconds, the ratio of seconds
to T, the same after subtracting the baseline (a process that only imports what
`run` imports, the executor with torch and the litellm backend with litellm,
measured in the same run: on a loaded machine those imports take seconds),
and how many connections the command opened. With `--old DIR` (a source
tree of another version, e.g. made with `git archive <rev> | tar -x -C DIR`)
the same commands run from that tree too, side by side in this run.

    python benchmarks/hung_server.py [--timeout 3] [--old /tmp/dlngraph-old]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the silent server lives with the tests
from servers import SilentServer  # noqa: E402

KEY_ENV = "HUNG_SERVER_BENCH_KEY"


@dataclass(frozen=True)
class Row:
    version: str
    command: str
    code: int
    seconds: float
    connections: int


def write_spec(directory: Path, api_base: str, timeout: float) -> Path:
    spec = {
        "name": "hung",
        "backends": {"api": {"kind": "litellm", "model": "openai/hung", "api_base": api_base, "api_key_env": KEY_ENV,
                             "timeout": timeout, "max_retries": 3, "backoff": 0.05}},
        "inputs": ["input"],
        "nodes": {"answer": {"prompt": "Yes or no?", "template": "{{ input }} {{ prompt }}",
                             "output": {"type": "choice", "choices": [" yes", " no"]}}},
        "outputs": {"answer": "target"},
    }  # fmt: skip
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


BASELINE = (
    "import dlngraph.runtime.executor; from dlngraph.runtime.backends.litellm_backend import import_litellm; "
    "import_litellm()"
)


def measure(version: str, tree: Path, args: list[str], server: SilentServer, home: Path) -> Row:
    env = {**os.environ, KEY_ENV: "sk-bench", "PYTHONPATH": str(tree), "DLNGRAPH_CACHE_DIR": str(home)}
    argv = ["-c", BASELINE] if args == ["baseline"] else ["-m", "dlngraph", *args]
    before = len(server.connections)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tree)
    seconds = time.perf_counter() - started
    label = "baseline: imports only" if args == ["baseline"] else " ".join(args[:1] + args[2:])
    return Row(version, label, done.returncode, seconds, len(server.connections) - before)


def run_all(server: SilentServer, args: argparse.Namespace) -> list[Row]:
    trees = [("this", ROOT)] + ([("old", args.old.resolve())] if args.old else [])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(Path(tmp), server.api_base, args.timeout)
        commands = [
            ["baseline"],
            ["compile", str(spec)],
            ["compile", str(spec), "--probe", "--probe-timeout", str(args.timeout)],
            ["run", str(spec), "--input", '{"input": "x"}', "--no-cache"],
        ]
        for version, tree in trees:
            for command in commands:
                if version == "old" and "--probe" in command:
                    continue  # the old compile always probes: its plain `compile` row is that case
                home = Path(tmp) / f"cache-{version}-{len(rows)}"  # no probe result carried over
                rows.append(measure(version, tree, command, server, home))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3.0, help="the backend's `timeout` (seconds)")
    parser.add_argument("--old", type=Path, help="a source tree of another version to run side by side")
    args = parser.parse_args()
    with SilentServer() as server:
        rows = run_all(server, args)
    print(f"backend timeout T = {args.timeout:g} s, max_retries 3; load average {os.getloadavg()[0]:.2f}")
    print(f"{'version':<8} {'command':<44} {'exit':>4} {'seconds':>8} {'x T':>6} {'(s-base) x T':>12} {'connections':>11}")
    base = {r.version: r.seconds for r in rows if r.command.startswith("baseline")}
    for r in rows:
        over = (r.seconds - base[r.version]) / args.timeout
        print(f"{r.version:<8} {r.command:<44} {r.code:>4} {r.seconds:>8.2f} {r.seconds / args.timeout:>6.2f} "
              f"{over:>12.2f} {r.connections:>11}")


if __name__ == "__main__":
    main()
