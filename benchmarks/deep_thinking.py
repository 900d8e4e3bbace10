"""Deep-Thinking vs in-context learning on MPQA and SUBJ, side by side in one run.

Accuracy (test subset, several seeds of demonstration choice, same
demonstrations for every method of a seed):
  zero-shot         the query alone
  icl               demonstrations + query (the state after one pass: identical)
  repeat-T          the demonstrations written T times, then the query
                    (T = the Deep-Thinking T of that seed)
  deep-thinking     the state after T passes, T selected on dev (never test)

Cost (seed 0, one query at a time; latencies interleaved query by query in one
process, peak memory measured for each method in its own fresh process):
  icl-reread        every query re-reads the demonstrations (no cache)
  icl-cached        the demonstrations' K/V computed once, reused per query
  deep-thinking     the learned state loaded from its safetensors file
Peak memory is the growth of the process's peak RSS (CPU; Linux clear_refs)
or of torch's peak CUDA allocation, over the loaded model. The one-time
thinking cost is printed separately.

    python benchmarks/deep_thinking.py                      # defaults below
    python benchmarks/deep_thinking.py --tasks mpqa --seeds 0 1 --test 50
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlngraph.compiler.plan import PlanNode
from dlngraph.runtime.data import read_jsonl
from dlngraph.runtime.kv_state import KVState
from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer, score_choices
from dlngraph.spec import DeepThinkingNode

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2  # queries run before timing starts
CHOICES = {"mpqa": ["negative", "positive"], "subj": ["objective", "subjective"]}


def make_layer(task: str, seed: int, args: argparse.Namespace, backend: Any) -> DeepThinkingLayer:
    spec = DeepThinkingNode(
        kind="deep_thinking",
        demonstrations={"split": "train", "count": args.shots, "seed": seed},
        demo_template="{{ input }}\nAnswer: {{ label }}",
        template="{{ input }}\nAnswer:",
        choices=CHOICES[task],
        eta=args.eta,
        beta=args.beta,
        max_steps=args.max_steps,
    )
    node = PlanNode("answer", "deep_thinking", "local", "torch", "choice", tuple(spec.choices), (), ("input",),
                    (), False, "target")
    paths = {split: args.data / task / f"{split}.jsonl" for split in ("train", "dev", "test")}
    return DeepThinkingLayer(node, spec, backend, data_paths=paths)


def split(args: argparse.Namespace, task: str, name: str, limit: int) -> tuple[list[dict[str, str]], list[str]]:
    examples = read_jsonl(args.data / task / f"{name}.jsonl", ["input", "target"], limit=limit)
    return [{"input": e["input"]} for e in examples], [e["target"] for e in examples]


def accuracy(
    layer: DeepThinkingLayer, state: KVState | None, rows: list[dict[str, str]], targets: list[str]
) -> float:
    scored = layer.choice_logprobs(state, rows)
    return sum(max(lp, key=lp.__getitem__) == t for lp, t in zip(scored, targets)) / len(targets)


def run_accuracy(task: str, args: argparse.Namespace, backend: Any) -> dict[str, Any]:
    test_rows, test_targets = split(args, task, "test", args.test)
    dev_rows, dev_targets = split(args, task, "dev", args.dev)
    per_seed: list[dict[str, Any]] = []
    zero_shot = accuracy(make_layer(task, 0, args, backend), None, test_rows, test_targets)
    for seed in args.seeds:
        layer = make_layer(task, seed, args, backend)
        text = layer.demo_text(layer.demonstrations())
        started = time.perf_counter()
        state = layer.prepare(dev_rows=dev_rows, dev_targets=dev_targets)
        select_s = time.perf_counter() - started
        steps = state.meta.steps
        row = {
            "seed": seed,
            "T": steps,
            "L": state.length,
            "dev_curve": [round(p.accuracy, 3) for p in layer.curve],
            "icl": accuracy(layer, layer.think(text, 1), test_rows, test_targets),
            "repeat": accuracy(layer, layer.think(text * steps, 1), test_rows, test_targets),
            "deep_thinking": accuracy(layer, state, test_rows, test_targets),
            "select_s": select_s,
        }
        print(f"  {task} seed {seed}: L={row['L']} T={steps} dev curve {row['dev_curve']} | "
              f"icl {row['icl']:.3f} repeat-{steps} {row['repeat']:.3f} deep-thinking {row['deep_thinking']:.3f} "
              f"| selecting T took {select_s:.1f} s", flush=True)
        per_seed.append(row)
    return {"zero_shot": zero_shot, "seeds": per_seed}


# ---------------------------------------------------------------------- cost, in a fresh process


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


METHODS = ("icl-reread", "icl-cached", "deep-thinking")


@dataclass
class CostInputs:
    text: str  # the rendered demonstrations
    demos: list[int]
    queries: list[list[int]]
    choices: list[list[list[int]]]


def cost_inputs(task: str, args: argparse.Namespace, backend: Any) -> tuple[DeepThinkingLayer, CostInputs]:
    layer = make_layer(task, 0, args, backend)
    text = layer.demo_text(layer.demonstrations())
    rows, _ = split(args, task, "test", args.latency_queries + WARMUP)
    queries, continuations = layer.queries(rows)
    ids = lambda text: list(backend.token_ids(text))  # noqa: E731
    choices = [[ids(c) for c in cs] for cs in continuations]
    return layer, CostInputs(text, ids(text), [ids(q) for q in queries], choices)


def prefix_of(method: str, layer: DeepThinkingLayer, inputs: CostInputs, state_file: Path) -> KVState | None:
    if method == "icl-cached":
        return layer.think(inputs.text, 1)  # pass 1 is the plain K/V cache of the demonstrations
    if method == "deep-thinking":
        return KVState.load(state_file)
    return None


def answer(model: Any, method: str, prefix: KVState | None, inputs: CostInputs, i: int) -> None:
    """One query, both choices; re-reading puts the demonstrations in front of it."""
    query = inputs.demos + inputs.queries[i] if method == "icl-reread" else inputs.queries[i]
    score_choices(model, prefix, [query], [inputs.choices[i]])
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def latencies(layer: DeepThinkingLayer, inputs: CostInputs, state_file: Path) -> dict[str, float]:
    """Median seconds per query of each method, interleaved query by query (rotating
    the order) so a busy machine slows every method alike."""
    prefixes = {m: prefix_of(m, layer, inputs, state_file) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(len(inputs.queries)):
        for m in METHODS[i % 3 :] + METHODS[: i % 3]:
            started = time.perf_counter()
            answer(layer.backend.model, m, prefixes[m], inputs, i)
            if i >= WARMUP:
                times[m].append(time.perf_counter() - started)
    return {m: statistics.median(ts) for m, ts in times.items()}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_memory(job: dict[str, Any]) -> float:
    """MiB one method adds to the peak over the loaded model, in this fresh process."""
    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    args = job["args"]
    torch.set_num_threads(args.threads)
    backend = TorchBackend(TorchBackendSpec(device=args.device))
    model = backend.model
    layer, inputs = cost_inputs(job["task"], args, backend)
    # A tiny forward touches every weight page (safetensors are memory-mapped),
    # so the figure is the method's own memory, not the model's.
    score_choices(model, None, [inputs.demos[:4]], [[inputs.demos[4:5]]])
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS counts again from here
        base = _rss_kib("VmRSS") * 1024
    prefix = prefix_of(job["method"], layer, inputs, Path(job["state"]))
    for i in range(len(inputs.queries)):
        answer(model, job["method"], prefix, inputs, i)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return (peak - base) / 2**20


def run_cost(task: str, args: argparse.Namespace, backend: Any, tmp: Path) -> dict[str, dict[str, float]]:
    layer, inputs = cost_inputs(task, args, backend)
    started = time.perf_counter()
    state = layer.think(inputs.text, args.cost_steps)
    think_s = time.perf_counter() - started
    state_file = tmp / f"{task}.safetensors"
    state.save(state_file)
    out: dict[str, dict[str, float]] = {
        "think": {"seconds": think_s, "state_mib": state_file.stat().st_size / 2**20, "L": state.length}
    }
    seconds = latencies(layer, inputs, state_file)
    ctx = multiprocessing.get_context("spawn")
    for method in METHODS:
        with ctx.Pool(1) as pool:
            job = {"method": method, "task": task, "args": args, "state": str(state_file)}
            peak = pool.apply(_peak_memory, (job,))
        out[method] = {"latency_s": seconds[method], "peak_mib": peak}
        print(f"  {task} {method}: {seconds[method] * 1000:.0f} ms/query, peak +{peak:.1f} MiB", flush=True)
    return out


def report(task: str, acc: dict[str, Any], cost: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    seeds = acc["seeds"]

    def summary(key: str) -> str:
        values = [s[key] for s in seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}  ({', '.join(f'{v:.2f}' for v in values)})"

    print(f"\n== {task}: {args.shots} demonstrations, test n={args.test}, dev n={args.dev}, "
          f"eta={args.eta}, beta={args.beta}, T in 1..{args.max_steps}, seeds {args.seeds}")
    print(f"  zero-shot        {acc['zero_shot']:.3f}")
    print(f"  icl              {summary('icl')}")
    print(f"  repeat-T         {summary('repeat')}   T per seed {[s['T'] for s in seeds]}")
    print(f"  deep-thinking    {summary('deep_thinking')}")
    reread = cost["icl-reread"]["latency_s"]
    for method in ("icl-reread", "icl-cached", "deep-thinking"):
        c = cost[method]
        ratio = c["latency_s"] / reread
        print(f"  {method:<16} {c['latency_s'] * 1000:7.1f} ms/query  ({ratio:.2f}x re-reading)  "
              f"peak +{c['peak_mib']:.1f} MiB")
    think = cost["think"]
    print(f"  one-time think   {think['seconds']:.2f} s for T={args.cost_steps} passes over "
          f"L={think['L']} tokens; "
          f"state file {think['state_mib']:.1f} MiB; selecting T on dev took "
          f"{statistics.mean(s['select_s'] for s in seeds):.1f} s per seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mpqa", "subj"], choices=sorted(CHOICES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--test", type=int, default=100, help="test examples scored")
    parser.add_argument("--dev", type=int, default=32, help="dev examples for selecting T")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--eta", type=float, default=0.01)
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--cost-steps", type=int, default=4, help="T of the state timed in the cost part")
    parser.add_argument("--latency-queries", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--data", type=Path, default=ROOT / "specs" / "data")
    args = parser.parse_args()

    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    torch.set_num_threads(args.threads)
    backend = TorchBackend(TorchBackendSpec(device=args.device, batch_size=16))
    print(f"model {backend.identity} on {backend.device}, {args.threads} thread(s)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            results[task] = (run_accuracy(task, args, backend), run_cost(task, args, backend, Path(tmp)))
    for task, (acc, cost) in results.items():
        report(task, acc, cost, args)


if __name__ == "__main__":
    main()
