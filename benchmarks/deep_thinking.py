"""Deep-Thinking vs in-context learning, side by side in one run.

Tasks: mpqa and subj (specs/data), navigate and hyperbaton (BIG-Bench-Hard,
benchmarks/data). For every task, seed of the demonstration draw and eta, ONE
thinking run of T = 1..max-steps passes; after each pass the state scores the
dev subset (selecting T, never on test) with raw and with contextually
calibrated choice scores (the label prior re-estimated from that state, as
`calibration: contextual` does on the node). Printed per task and eta:

  icl               the state after one pass (plain in-context learning)
  repeat-T          the demonstrations written T times (T = the selected T),
                    skipped with the reason when T x L does not fit the context
  deep-thinking     the state after the T selected on dev
  McNemar           exact two-sided test of deep-thinking vs icl on the test
                    predictions of all seeds pooled (b: only DT right, c: only ICL right)
  |dK|/|K| |dV|/|V| the relative size of each pass's update (mean over seeds)
  margin            mean |log p(top) - log p(second)| of the choices on test

The ICL columns do not depend on eta; they are scored once per seed.

Cost (unless --no-cost; seed 0, one query at a time; latencies interleaved
query by query in one process, peak memory measured for each method in its
own fresh process):
  icl-reread        every query re-reads the demonstrations (no cache)
  icl-cached        the demonstrations' K/V computed once, reused per query
  deep-thinking     the learned state loaded from its safetensors file
Peak memory is the growth of the process's peak RSS (CPU; Linux clear_refs)
or of torch's peak CUDA allocation, over the loaded model. The one-time
thinking cost is printed separately.

    python benchmarks/deep_thinking.py                      # defaults below
    python benchmarks/deep_thinking.py --tasks mpqa --seeds 0 1 --test 50 --etas 0.1 --no-cost
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlngraph.compiler.plan import NodeKind, PlanNode
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import ScoreRequest
from dlngraph.runtime.cache import CachedBackend, MemoryCache
from dlngraph.runtime.data import read_jsonl
from dlngraph.runtime.kv_state import KVState
from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer, best_step, step_score
from dlngraph.spec import DeepThinkingNode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks: one task table, one McNemar test

from fit_quality import TASKS, mcnemar  # noqa: E402  (the task table: data directory, labels)

WARMUP = 2  # queries run before timing starts
MODES = ("raw", "calibrated")
DEFAULT_TASKS = ["mpqa", "subj", "navigate", "hyperbaton"]


def data_dir(task: str) -> Path:
    return TASKS[task][0]


def make_layer(task: str, seed: int, args: argparse.Namespace, backend: Any, eta: float) -> DeepThinkingLayer:
    spec = DeepThinkingNode(
        kind="deep_thinking",
        demonstrations={"split": "train", "count": args.shots, "seed": seed},
        demo_template="{{ input }}\nAnswer: {{ label }}",
        template="{{ input }}\nAnswer:",
        choices=TASKS[task][1],
        eta=eta,
        beta=args.beta,
        max_steps=args.max_steps,
        calibration="contextual",
    )
    node = PlanNode("answer", NodeKind.DEEP_THINKING, "local", "torch", "choice", tuple(spec.choices), (), ("input",),
                    (), False, "target", spec=spec)
    paths = {split: data_dir(task) / f"{split}.jsonl" for split in ("train", "dev", "test")}
    return DeepThinkingLayer(node, backend, data_paths=paths)


def split(task: str, name: str, limit: int) -> tuple[list[dict[str, str]], list[str]]:
    examples = read_jsonl(data_dir(task) / f"{name}.jsonl", ["input", "target"], limit=limit)
    return [{"input": e["input"]} for e in examples], [e["target"] for e in examples]


def predictions(scored: list[dict[str, float]]) -> list[str]:
    return [max(lp, key=lp.__getitem__) for lp in scored]


def margin(scored: list[dict[str, float]]) -> float:
    tops = [sorted(lp.values(), reverse=True) for lp in scored]
    return statistics.mean(t[0] - t[1] for t in tops)


@dataclass
class Scored:
    """One method's test outcome for one seed."""

    steps: int
    correct: list[bool]
    margin: float

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass
class SeedRun:
    seed: int
    length: int
    icl: dict[str, Scored]  # per mode
    deep_thinking: dict[str, Scored]
    repeat: Scored | str  # a Scored, or why the baseline was skipped
    dev_curve: dict[str, list[float]]
    changes: list[tuple[float, float]]  # per pass >= 2: (|dK|/|K|, |dV|/|V|)
    seconds: float


@dataclass
class EtaRun:
    eta: float
    seeds: list[SeedRun] = field(default_factory=list)


def scores_of(layer: DeepThinkingLayer, state: KVState | None, rows: list[dict[str, str]]) -> dict[str, list[dict[str, float]]]:
    """Raw and contextually calibrated choice log-probs from `state` (the rows are
    scored once: the second asks again and the layer's in-run memo answers)."""
    return {"raw": layer.choice_logprobs(state, rows, calibrated=False), "calibrated": layer.choice_logprobs(state, rows)}


def test_outcome(steps: int, scored: list[dict[str, float]], targets: list[str]) -> Scored:
    return Scored(steps, [p == t for p, t in zip(predictions(scored), targets)], margin(scored))


def run_seed(
    task: str, seed: int, eta: float, args: argparse.Namespace, backend: Any,
    dev: tuple[list[dict[str, str]], list[str]], test: tuple[list[dict[str, str]], list[str]],
    icl_cache: dict[int, tuple[dict[str, Scored], dict[str, Any]]],
    repeat_cache: dict[tuple[int, int], Scored | str],
) -> SeedRun:
    started = time.perf_counter()
    layer = make_layer(task, seed, args, backend, eta)
    text = layer.demo_text(layer.demonstrations())
    curves: dict[str, list[Any]] = {m: [] for m in MODES}
    best_states: dict[str, KVState] = {}
    for state in layer.think_steps(text):
        steps = state.meta.steps
        if steps == 1 and seed in icl_cache:
            icl, dev_points = icl_cache[seed]
        else:
            dev_scored = scores_of(layer, state, dev[0])
            dev_points = {m: step_score(steps, dev_scored[m], dev[1]) for m in MODES}
            if steps == 1:
                test_scored = scores_of(layer, state, test[0])
                icl = {m: test_outcome(1, test_scored[m], test[1]) for m in MODES}
                icl_cache[seed] = (icl, dev_points)
        for m in MODES:
            curves[m].append(dev_points[m])
            if best_step(curves[m]) is dev_points[m]:
                best_states[m] = state.clone()
        if steps >= args.max_steps:
            break
    changes = [(c.key_update, c.value_update) for c in layer.changes]
    deep: dict[str, Scored] = {}
    tested: dict[int, dict[str, list[dict[str, float]]]] = {}  # both modes from one scoring per T
    for m in MODES:
        state = best_states[m]
        if state.meta.steps == 1:
            deep[m] = icl[m]  # T = 1 is ICL exactly
            continue
        if state.meta.steps not in tested:
            tested[state.meta.steps] = scores_of(layer, state, test[0])
        deep[m] = test_outcome(state.meta.steps, tested[state.meta.steps][m], test[1])
    steps = deep["raw"].steps
    key = (seed, steps)
    if key not in repeat_cache:
        repeat_cache[key] = repeat_baseline(layer, text, steps, test)
    return SeedRun(
        seed,
        best_states["raw"].length,
        icl,
        deep,
        repeat_cache[key],
        {m: [round(p.accuracy, 3) for p in curves[m]] for m in MODES},
        changes,
        time.perf_counter() - started,
    )


def repeat_baseline(
    layer: DeepThinkingLayer, text: str, steps: int, test: tuple[list[dict[str, str]], list[str]]
) -> Scored | str:
    """The demonstrations written `steps` times then the query, or why that does not fit."""
    longest = max(len(layer.engine.token_ids(q)) for q in layer.queries(test[0])[0]) + 8
    try:
        layer.engine.check_context(len(layer.engine.token_ids(text * steps)) + longest,
                                   f"{steps} x the demonstrations with the longest query")
    except RuntimeFailure as exc:
        return f"skipped: {str(exc).splitlines()[0]}"
    state = layer.think(text * steps, 1)
    return test_outcome(steps, layer.choice_logprobs(state, test[0]), test[1])


def run_accuracy(task: str, args: argparse.Namespace, backend: Any) -> list[EtaRun]:
    test = split(task, "test", args.test)
    dev = split(task, "dev", args.dev)
    icl_cache: dict[int, tuple[dict[str, Scored], dict[str, Any]]] = {}
    repeat_cache: dict[tuple[int, int], Scored | str] = {}
    runs = []
    for eta in args.etas:
        run = EtaRun(eta)
        for seed in args.seeds:
            r = run_seed(task, seed, eta, args, CachedBackend(backend, MemoryCache()), dev, test, icl_cache, repeat_cache)
            repeat = r.repeat if isinstance(r.repeat, str) else f"{r.repeat.accuracy:.3f}"
            print(f"  {task} eta {eta} seed {seed}: L={r.length} "
                  f"dev raw {r.dev_curve['raw']} cal {r.dev_curve['calibrated']} | "
                  f"icl {r.icl['raw'].accuracy:.3f}/{r.icl['calibrated'].accuracy:.3f} "
                  f"dt T={r.deep_thinking['raw'].steps} {r.deep_thinking['raw'].accuracy:.3f} "
                  f"cal T={r.deep_thinking['calibrated'].steps} {r.deep_thinking['calibrated'].accuracy:.3f} "
                  f"repeat {repeat} | |dK|/|K| {[f'{k:.1e}' for k, _ in r.changes]} | {r.seconds:.0f} s", flush=True)
            run.seeds.append(r)
        runs.append(run)
    return runs


def report_accuracy(task: str, runs: list[EtaRun], args: argparse.Namespace) -> None:
    print(f"\n== {task}: {args.shots} demonstrations, test n={args.test}, dev n={args.dev}, beta={args.beta}, "
          f"T in 1..{args.max_steps} selected on dev, seeds {args.seeds}")
    print(f"  {'eta':>5} {'mode':<10} {'icl':>6} {'dt':>6} {'T/seed':<10} {'b':>3} {'c':>3} {'McNemar p':>9} "
          f"{'repeat-T':>8} {'margin icl->dt':>15}  |dK|/|K| per pass (mean over seeds)")
    for run in runs:
        for m in MODES:
            icl = [s.icl[m] for s in run.seeds]
            dt = [s.deep_thinking[m] for s in run.seeds]
            icl_correct = [hit for x in icl for hit in x.correct]
            dt_correct = [hit for x in dt for hit in x.correct]
            b = sum(d and not i for d, i in zip(dt_correct, icl_correct))
            c = sum(i and not d for d, i in zip(dt_correct, icl_correct))
            repeats = [s.repeat for s in run.seeds if not isinstance(s.repeat, str)]
            repeat = f"{statistics.mean(r.accuracy for r in repeats):.3f}" if repeats and m == "raw" else "-"
            passes = max(len(s.changes) for s in run.seeds)
            dk = [statistics.mean(s.changes[i][0] for s in run.seeds if i < len(s.changes)) for i in range(passes)]
            print(f"  {run.eta:>5} {m:<10} {statistics.mean(x.accuracy for x in icl):6.3f} "
                  f"{statistics.mean(x.accuracy for x in dt):6.3f} {str([x.steps for x in dt]):<10} {b:3d} {c:3d} "
                  f"{mcnemar(icl_correct, dt_correct):9.3f} {repeat:>8} "
                  f"{statistics.mean(x.margin for x in icl):6.2f}->{statistics.mean(x.margin for x in dt):5.2f}  "
                  f"{' '.join(f'{v:.1e}' for v in dk)}")
        for s in run.seeds:
            if isinstance(s.repeat, str):
                print(f"        seed {s.seed} repeat-{s.deep_thinking['raw'].steps}: {s.repeat}")


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
    queries: list[str]
    continuations: list[list[str]]


def cost_inputs(task: str, args: argparse.Namespace, backend: Any) -> tuple[DeepThinkingLayer, CostInputs]:
    layer = make_layer(task, 0, args, backend, args.etas[0])
    rows, _ = split(task, "test", args.latency_queries + WARMUP)
    return layer, CostInputs(layer.demo_text(layer.demonstrations()), *layer.queries(rows))


def prefix_of(method: str, backend: Any, layer: DeepThinkingLayer, inputs: CostInputs, state_file: Path) -> str:
    """The digest of the state a method reads after, held on the backend ("" for none)."""
    if method == "icl-cached":
        return backend.hold(method, layer.think(inputs.text, 1))  # pass 1: the demonstrations' plain K/V cache
    if method == "deep-thinking":
        return backend.hold(method, KVState.load(state_file))
    return ""


def answer(backend: Any, method: str, state: str, inputs: CostInputs, i: int) -> None:
    """One query, both choices, through the backend's scoring; re-reading sends the
    demonstrations as the prefix of the query (their cache is computed per call)."""
    prefix = inputs.text if method == "icl-reread" else ""
    backend.score([ScoreRequest(inputs.queries[i], c, prefix=prefix, state=state) for c in inputs.continuations[i]])
    if backend.device.type == "cuda":
        torch.cuda.synchronize()


def latencies(backend: Any, layer: DeepThinkingLayer, inputs: CostInputs, state_file: Path) -> dict[str, float]:
    """Median seconds per query of each method, interleaved query by query (rotating
    the order) so a busy machine slows every method alike."""
    prefixes = {m: prefix_of(m, backend, layer, inputs, state_file) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(len(inputs.queries)):
        for m in METHODS[i % 3 :] + METHODS[: i % 3]:
            started = time.perf_counter()
            answer(backend, m, prefixes[m], inputs, i)
            if i >= WARMUP:
                times[m].append(time.perf_counter() - started)
    return {m: statistics.median(ts) for m, ts in times.items()}


def _peak_memory(job: dict[str, Any]) -> float:
    """MiB one method adds to the peak over the loaded model, in this fresh process."""
    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    args = job["args"]
    torch.set_num_threads(args.threads)
    backend = TorchBackend(TorchBackendSpec(device=args.device))
    layer, inputs = cost_inputs(job["task"], args, backend)
    # A tiny forward touches every weight page (safetensors are memory-mapped),
    # so the figure is the method's own memory, not the model's.
    backend.score([ScoreRequest(inputs.text[:20], inputs.text[20:24])])
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS counts again from here
        base = _rss_kib("VmRSS") * 1024
    prefix = prefix_of(job["method"], backend, layer, inputs, Path(job["state"]))
    for i in range(len(inputs.queries)):
        answer(backend, job["method"], prefix, inputs, i)
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
    seconds = latencies(backend, layer, inputs, state_file)
    ctx = multiprocessing.get_context("spawn")
    for method in METHODS:
        with ctx.Pool(1) as pool:
            job = {"method": method, "task": task, "args": args, "state": str(state_file)}
            peak = pool.apply(_peak_memory, (job,))
        out[method] = {"latency_s": seconds[method], "peak_mib": peak}
        print(f"  {task} {method}: {seconds[method] * 1000:.0f} ms/query, peak +{peak:.1f} MiB", flush=True)
    return out


def report_cost(task: str, cost: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    reread = cost["icl-reread"]["latency_s"]
    for method in METHODS:
        c = cost[method]
        ratio = c["latency_s"] / reread
        print(f"  {method:<16} {c['latency_s'] * 1000:7.1f} ms/query  ({ratio:.2f}x re-reading)  "
              f"peak +{c['peak_mib']:.1f} MiB")
    think = cost["think"]
    print(f"  one-time think   {think['seconds']:.2f} s for T={args.cost_steps} passes over "
          f"L={think['L']} tokens; state file {think['state_mib']:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=sorted(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--test", type=int, default=100, help="test examples scored")
    parser.add_argument("--dev", type=int, default=32, help="dev examples for selecting T")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--etas", nargs="+", type=float, default=[0.01, 0.1, 0.3])
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--no-cost", action="store_true", help="accuracy only: skip latency and peak memory")
    parser.add_argument("--cost-steps", type=int, default=4, help="T of the state timed in the cost part")
    parser.add_argument("--latency-queries", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()

    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    torch.set_num_threads(args.threads)
    backend = TorchBackend(TorchBackendSpec(device=args.device))
    print(f"model {backend.identity} on {backend.device}, {args.threads} thread(s)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            accuracy = run_accuracy(task, args, backend)
            cost = None if args.no_cost else run_cost(task, args, backend, Path(tmp))
            results[task] = (accuracy, cost)
    for task, (accuracy, cost) in results.items():
        report_accuracy(task, accuracy, args)
        if cost is not None:
            report_cost(task, cost, args)


if __name__ == "__main__":
    main()
