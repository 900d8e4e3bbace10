"""The torch backend against the limits of the device it runs on, side by side in one run.

On CUDA (or, at small sizes, on CPU) prints:

  limits         memory bandwidth (a large device-to-device copy, read + write),
                 matmul throughput in float32 and bfloat16, and the kernel-launch
                 floor: the time of N tiny kernels in a row, N = the kernels one
                 eager decode step launches (counted with torch.profiler), issued
                 eagerly and (CUDA) replayed as one CUDA graph
  decode         ms per step at batch 1/16/64 of "today" (eager float32, dynamic
                 cache: the path before issue 15) and of the backend's default
                 (CUDA: bfloat16, static cache, CUDA graphs), each beside its
                 floors: bandwidth (weights + KV cache read / bandwidth), compute
                 (2 x parameters x rows / matmul peak) and launches
  scoring        examples/s of `TorchBackend.score` (2 choices per review), today vs default
  dln2           one dln2-subj fit iteration (forward + backward), today vs default
  deep-thinking  one-time think (T passes over the demonstrations) and the cost of one
                 query (both choices), beside the same floors

On CPU the default path is today's path (float32, eager, dynamic cache), so the
"default" columns there check that nothing regressed rather than a speed-up.

    python benchmarks/gpu.py                        # sizes for the device found
    python benchmarks/gpu.py --device cpu --steps 4 --skip dln2

On a machine with a GPU, the whole check is (tests first, then the figures):

    python -m pytest -q -rs -m cuda tests/test_torch_backend.py tests/test_deep_thinking.py
    python benchmarks/gpu.py
    python benchmarks/deep_thinking.py --device cuda --no-cost
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlngraph.runtime.backends.base import ScoreRequest
from dlngraph.runtime.backends.torch_backend import TorchBackend, select_cache
from dlngraph.spec import TorchBackendSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks: shared inputs

from backward_batching import one_iteration  # noqa: E402
from scoring import INSTRUCTION, make_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


# ---------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(run: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """The fastest of `repeats` timed runs (after one untimed warm-up)."""
    run()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


# ---------------------------------------------------------------------- limits


@dataclass
class Limits:
    bandwidth: float  # bytes/s, device memory
    matmul: dict[torch.dtype, float]  # FLOP/s
    launch_eager: float  # seconds per tiny kernel, issued one by one
    launch_graph: float | None  # seconds per tiny kernel, replayed in one CUDA graph


def measure_limits(device: torch.device, big: bool) -> Limits:
    size = (1 << 30) if big else (1 << 27)  # bytes copied
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = best_seconds(lambda: dst.copy_(src), device)
    bandwidth = 2 * size / copy  # every byte read once and written once
    del src, dst
    n = 8192 if big else 1024
    matmul = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        matmul[dtype] = 2 * n**3 / best_seconds(lambda: a @ b, device)
    x = torch.zeros(1, device=device)
    kernels = 1000

    def tiny() -> None:
        for _ in range(kernels):
            x.add_(1)

    eager = best_seconds(tiny, device) / kernels
    graph = None
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            tiny()  # warm-up off the default stream, as CUDA graph capture requires
        torch.cuda.current_stream().wait_stream(stream)
        recorded = torch.cuda.CUDAGraph()
        with torch.cuda.graph(recorded):
            tiny()
        graph = best_seconds(recorded.replay, device) / kernels
    return Limits(bandwidth, matmul, eager, graph)


# ---------------------------------------------------------------------- decode


def model_bytes(backend: TorchBackend) -> int:
    return sum(p.numel() * p.element_size() for p in backend.model.parameters())


def body_parameters(backend: TorchBackend) -> int:
    """Parameters that are matmuls per token (the embedding lookup is not)."""
    model = backend.model
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()


def kv_bytes_per_token(backend: TorchBackend) -> int:
    config = backend.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * backend.dtype.itemsize


class Decoding:
    """Greedy decode steps of `batch` copies of one prompt, on the backend's own path."""

    def __init__(self, backend: TorchBackend, batch: int, steps: int) -> None:
        self.backend = backend
        self.batch = batch
        self.steps = steps
        prompt = backend.token_ids(PROMPT)
        self.ids, self.mask = backend._pad([prompt])
        self.width = len(prompt)

    def prefill(self) -> tuple[Any, torch.Tensor]:
        b = self.backend
        positions = torch.arange(self.width)[None]
        hidden, cache = b._hidden(self.ids, self.mask, positions, None)
        return cache, b._logprobs(hidden[:, -1]).expand(self.batch, -1)

    def run(self) -> float:
        """Seconds per decode step (prefill excluded), after one untimed run
        (compilation and CUDA-graph recording happen there)."""
        self.timed_run()
        return self.timed_run()

    def timed_run(self) -> float:
        b = self.backend
        with torch.inference_mode():
            cache, logprobs = self.prefill()
            rows = torch.zeros(self.batch, dtype=torch.long)
            mask = self.mask[rows]
            decoder = b._static_decoder()
            if decoder is not None:
                step = decoder.session(cache, rows, mask, self.steps).step
            else:
                cache = select_cache(cache, rows.to(b.device))

                def step(tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
                    nonlocal mask, cache
                    mask = torch.cat([mask, torch.ones(self.batch, 1, dtype=torch.long)], dim=1)
                    hidden, cache = b._hidden(tokens[:, None], mask, at, cache)
                    return b._logprobs(hidden[:, -1])

            sync(b.device)
            started = time.perf_counter()
            positions = torch.full((self.batch, 1), self.width - 1)
            for _ in range(self.steps):
                tokens = logprobs.argmax(dim=-1)
                positions = positions + 1
                logprobs = step(tokens, positions)
            sync(b.device)
            return (time.perf_counter() - started) / self.steps


def launches_per_step(backend: TorchBackend) -> int:
    """Kernels (CUDA) or top-level operators (CPU) one eager decode step issues."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    decoding = Decoding(backend, 1, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if backend.device.type == "cuda" else [])
    with torch.inference_mode():
        cache, logprobs = decoding.prefill()
        tokens = logprobs.argmax(dim=-1)
        mask = torch.ones(1, decoding.width + 1, dtype=torch.long)
        with profile(activities=activities) as prof:
            hidden, _ = backend._hidden(tokens[:, None], mask, torch.tensor([[decoding.width]]), cache)
            backend._logprobs(hidden[:, -1])
            sync(backend.device)
    events = prof.events()
    if backend.device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)


def report_decode(today: TorchBackend, default: TorchBackend, limits: Limits, batches: list[int], steps: int) -> None:
    launches = launches_per_step(today)
    launch_eager = launches * limits.launch_eager
    graph = f", {launches * limits.launch_graph * 1e3:.3f} ms as one CUDA graph" if limits.launch_graph else ""
    print(f"\ndecode: one eager step issues {launches} {'kernels' if today.device.type == 'cuda' else 'operators'}; "
          f"launch floor {launch_eager * 1e3:.3f} ms eager{graph}")
    print(f"  {'batch':>5} {'today ms':>9} {'default ms':>10} {'speed-up':>8}   floors of the default: "
          f"{'bandwidth':>9} {'compute':>8} {'launch':>7}  (ms)")
    for batch in batches:
        t = Decoding(today, batch, steps).run()
        d = Decoding(default, batch, steps).run()
        read = model_bytes(default) + batch * (Decoding(default, 1, 1).width + steps) * kv_bytes_per_token(default)
        bandwidth = read / limits.bandwidth
        compute = 2 * body_parameters(default) * batch / limits.matmul.get(default.dtype, limits.matmul[torch.float32])
        launch = launches * (limits.launch_graph if default._static_decoder() is not None and limits.launch_graph
                             else limits.launch_eager)
        print(f"  {batch:>5} {t * 1e3:9.2f} {d * 1e3:10.2f} {t / d:7.2f}x   {'':>21}"
              f"{bandwidth * 1e3:9.3f} {compute * 1e3:8.3f} {launch * 1e3:7.3f}")


# ---------------------------------------------------------------------- scoring, DLN-2, Deep-Thinking


def report_scoring(today: TorchBackend, default: TorchBackend, limits: Limits, examples: int) -> None:
    requests = [
        ScoreRequest(prompt=text, continuation=" " + c, prefix=INSTRUCTION)
        for text, _ in make_examples(examples)
        for c in ("positive", "negative")
    ]
    tokens = sum(len(today.encode(r).prompt) for r in requests[::2])  # each example's prompt is run once
    print(f"\nscoring: {examples} examples x 2 choices, {tokens} prompt tokens after the shared instruction")
    for label, backend in (("today", today), ("default", default)):
        seconds = best_seconds(lambda b=backend: b.score(requests), backend.device, repeats=2)
        floor = 2 * body_parameters(backend) * tokens / limits.matmul.get(backend.dtype, limits.matmul[torch.float32])
        print(f"  {label:<8} {examples / seconds:9.1f} examples/s  {seconds:7.3f} s  (compute floor {floor:.3f} s; "
              f"{backend.dtype}, batch {backend.rows_per_batch(200)})")


def report_dln2(today: TorchBackend, default: TorchBackend, batch_size: int) -> None:
    from dlngraph.api import compile_spec
    from dlngraph.runtime.backward import rng_for
    from dlngraph.runtime.data import read_jsonl

    plan = compile_spec(ROOT / "specs" / "dln2-subj.yaml")
    train = plan.spec.train
    examples = read_jsonl(plan.data_paths["train"], [*plan.spec.inputs, *plan.spec.outputs.values()])
    indices = sorted(rng_for(train.seed, 1, "batch").sample(range(len(examples)), batch_size))
    batch = [examples[i] for i in indices]
    print(f"\ndln2-subj: one fit iteration, B={batch_size}, N={train.prompt_proposals}, K={train.posterior_samples}")
    for label, backend in (("today", today), ("default", default)):
        one_iteration(plan, backend, batch, indices)  # warm-up: compilation, allocator
        calls, requests, seconds, _ = one_iteration(plan, backend, batch, indices)
        print(f"  {label:<8} {seconds:7.2f} s  ({calls} model calls, {requests} requests)")


def report_deep_thinking(backends: dict[str, TorchBackend], limits: Limits, steps: int, queries: int) -> None:
    from dlngraph.compiler.plan import NodeKind, PlanNode
    from dlngraph.runtime.data import read_jsonl
    from dlngraph.runtime.backends.base import ScoreRequest
    from dlngraph.runtime.layers.deep_thinking import DeepThinkingLayer
    from dlngraph.spec import DeepThinkingNode

    data = ROOT / "specs" / "data" / "mpqa"
    spec = DeepThinkingNode(
        kind="deep_thinking",
        demonstrations={"split": "train", "count": 8, "seed": 0},
        demo_template="{{ input }}\nAnswer: {{ label }}",
        template="{{ input }}\nAnswer:",
        choices=["negative", "positive"],
        eta=0.1,
        steps=steps,
    )
    node = PlanNode("answer", NodeKind.DEEP_THINKING, "local", "torch", "choice", tuple(spec.choices), (), ("input",),
                    (), False, "target", spec=spec)
    rows = [{"input": e["input"]} for e in read_jsonl(data / "test.jsonl", ["input"], limit=queries)]
    print(f"\ndeep-thinking (mpqa, 8 demonstrations, T={steps}):")
    for label, backend in backends.items():
        layer = DeepThinkingLayer(node, backend, data_paths={"train": data / "train.jsonl"})
        text = layer.demo_text(layer.demonstrations())
        think = best_seconds(lambda: layer.think(text, steps), backend.device, repeats=2)
        state = layer.think(text, steps)
        texts, continuations = layer.queries(rows)
        digest = backend.hold("answer", state)
        requests = [[ScoreRequest(t, c, state=digest) for c in cs] for t, cs in zip(texts, continuations)]
        per_query = []
        for i in range(len(rows)):
            per_query.append(best_seconds(lambda i=i: backend.score(requests[i]), backend.device, repeats=1))
        peak = limits.matmul.get(backend.dtype, limits.matmul[torch.float32])
        think_floor = 2 * body_parameters(backend) * state.length * steps / peak  # T passes of L tokens
        query_floor = max(model_bytes(backend) / limits.bandwidth,
                          2 * body_parameters(backend) * statistics.mean(len(backend.token_ids(t)) for t in texts) / peak)
        print(f"  {label:<8} think {think * 1e3:8.1f} ms over L={state.length} (compute floor {think_floor * 1e3:.2f} ms); "
              f"query {statistics.median(per_query) * 1e3:7.2f} ms median (floor {query_floor * 1e3:.3f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batches", default="1,16,64", help="decode batch sizes")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed (default 64 on CUDA, 4 on CPU)")
    parser.add_argument("--examples", type=int, default=None, help="scoring examples (default 512 CUDA, 16 CPU)")
    parser.add_argument("--dln2-batch", type=int, default=None, help="DLN-2 mini-batch (default: the spec's on CUDA, 2 on CPU)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "scoring", "dln2", "deep-thinking"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    default = TorchBackend(TorchBackendSpec(device=args.device))
    today = TorchBackend(TorchBackendSpec(device=args.device, dtype="float32", batch_size=16, compile=False))
    default.model  # noqa: B018 - load before timing
    today.model  # noqa: B018
    device = default.device
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; model {default.source.identity}")
    print(f"today: float32, eager, dynamic cache, batch 16; default: {default.dtype}, "
          f"{'static cache + CUDA graphs' if default._static_decoder() is not None else 'eager, dynamic cache'}, "
          f"batch {'from free memory' if cuda else default.rows_per_batch(0)}")
    limits = measure_limits(device, big=cuda)
    print(f"limits: bandwidth {limits.bandwidth / 1e9:.1f} GB/s; matmul "
          + ", ".join(f"{str(d).removeprefix('torch.')} {v / 1e12:.2f} TFLOP/s" for d, v in limits.matmul.items())
          + f"; launch {limits.launch_eager * 1e6:.2f} us/kernel eager"
          + (f", {limits.launch_graph * 1e6:.2f} us/kernel in a CUDA graph" if limits.launch_graph else ""))
    if "decode" not in args.skip:
        report_decode(today, default, limits, [int(b) for b in args.batches.split(",")], args.steps or (64 if cuda else 4))
    if "scoring" not in args.skip:
        report_scoring(today, default, limits, args.examples or (512 if cuda else 16))
    if "dln2" not in args.skip:
        report_dln2(today, default, args.dln2_batch or (20 if cuda else 2))
    if "deep-thinking" not in args.skip:
        report_deep_thinking({"today": today, "default": default}, limits, steps=4, queries=20 if cuda else 5)


if __name__ == "__main__":
    main()
