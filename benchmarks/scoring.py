"""Choice scoring on the embedded model: what batching and KV reuse buy.

Prints examples/second for three ways of scoring every choice of every example,
side by side in one run, in float32 and bfloat16:

  (a) one forward per (example, choice), full sequence, batch 1
  (b) the same sequences as padded batches
  (c) the torch backend: the shared instruction's KV cache computed once, each
      example encoded once on top of it, every choice scored from that pass

plus achieved GFLOP/s (2 x parameters x tokens actually computed / seconds)
against a large matmul in the same dtype, cold/warm model load time, peak RSS,
and how often bfloat16 picks the same choice as float32.

    python benchmarks/scoring.py             # 64 examples, 2 and 4 choices
    python benchmarks/scoring.py --examples 16 --skip-cold
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dlngraph.runtime.backends.base import ScoreRequest
from dlngraph.runtime.backends.torch_backend import TorchBackend
from dlngraph.spec import TorchBackendSpec

INSTRUCTION = (
    "You are a careful annotator of customer reviews. Read the review below and decide which label "
    "describes the overall opinion of the writer about the product or the experience. Ignore small "
    "complaints when the writer is clearly happy overall, and ignore polite words when the writer is "
    "clearly disappointed. Answer with one label only, written exactly as in the list of labels.\n\n"
)
GOOD = [
    "The battery easily lasts two full days and charging is quick.",
    "Setup took five minutes and everything worked the first time.",
    "The staff were friendly and went out of their way to help us.",
    "Sound quality is rich and clear, even at high volume.",
    "It feels solid and well made, much better than my old one.",
    "Delivery was early and the packaging was neat and tidy.",
    "I use it every day and it still looks brand new.",
    "For the price, I honestly could not ask for anything more.",
]
BAD = [
    "The battery died after a few hours and charging takes forever.",
    "Setup failed three times and support never answered my emails.",
    "The staff ignored us and the room smelled of smoke.",
    "Sound crackles and distorts as soon as you turn it up.",
    "It feels cheap and flimsy, and a button broke in the first week.",
    "Delivery was two weeks late and the box arrived crushed.",
    "After a month it stopped turning on altogether.",
    "It is overpriced junk and I regret buying it.",
]
CHOICES = {2: ["positive", "negative"], 4: ["positive", "negative", "neutral", "mixed"]}


def make_examples(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(review text, label): ~6 sentences of one polarity, ~150 tokens with the frame."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label, pool = ("positive", GOOD) if i % 2 == 0 else ("negative", BAD)
        sentences = rng.sample(pool, 6)
        out.append((f"Review: {' '.join(sentences)}\nLabels: positive, negative, neutral, mixed\nLabel:", label))
    return out


class CountingBackend(TorchBackend):
    """The torch backend, counting the token positions it runs and projects to logits."""

    def __init__(self, spec: TorchBackendSpec) -> None:
        super().__init__(spec)
        self.body_tokens = 0
        self.head_tokens = 0

    def _hidden(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.body_tokens += ids.numel()
        return super()._hidden(ids, *args, **kwargs)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        self.head_tokens += hidden.numel() // hidden.shape[-1]
        return super()._logprobs(hidden)


@dataclass
class Timing:
    seconds: float
    body_tokens: int
    head_tokens: int
    logprobs: list[list[float]]  # per request


def continuation_logprobs(logprobs: torch.Tensor, start: int, continuation: tuple[int, ...]) -> list[float]:
    return [float(logprobs[start + j - 1, tok]) for j, tok in enumerate(continuation)]


def score_one_by_one(backend: TorchBackend, requests: list[ScoreRequest]) -> Timing:
    """(a): a full forward of prefix + prompt + continuation for every request."""
    encoded = [backend.encode(r) for r in requests]
    out, body = [], 0
    started = time.perf_counter()
    with torch.inference_mode():
        for e in encoded:
            ids = torch.tensor([e.ids], device=backend.device)
            logprobs = torch.log_softmax(backend.model(ids).logits[0].float(), dim=-1)
            out.append(continuation_logprobs(logprobs, len(e.prefix) + len(e.prompt), e.continuation))
            body += ids.numel()
    return Timing(time.perf_counter() - started, body, body, out)


def score_padded(backend: TorchBackend, requests: list[ScoreRequest], batch_size: int) -> Timing:
    """(b): the same full sequences, right-padded into batches."""
    encoded = [backend.encode(r) for r in requests]
    out, body = [], 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            ids, mask = backend._pad([e.ids for e in chunk])
            logits = backend.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, e in enumerate(chunk):
                out.append(continuation_logprobs(logprobs[row], len(e.prefix) + len(e.prompt), e.continuation))
            body += ids.numel()
    return Timing(time.perf_counter() - started, body, body, out)


def score_reused(backend: CountingBackend, requests: list[ScoreRequest]) -> Timing:
    """(c): the backend's own path (prefix KV reuse, one pass per example)."""
    backend.body_tokens = backend.head_tokens = 0
    started = time.perf_counter()
    scores = backend.score(requests)
    return Timing(time.perf_counter() - started, backend.body_tokens, backend.head_tokens, [list(s.token_logprobs) for s in scores])


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 4, trials: int = 3) -> float:
    """The machine's compute limit in `dtype`: the best of a few timed large matmuls."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def model_gflop(backend: TorchBackend, timing: Timing) -> float:
    """2 x parameters x tokens computed; the output projection only where it ran."""
    head = backend.model.get_output_embeddings().weight.numel()
    embed = backend.model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in backend.model.parameters())
    tied = backend.model.get_output_embeddings().weight is backend.model.get_input_embeddings().weight
    body = total - embed - (0 if tied else head)  # embedding lookups are not matmuls
    return 2 * (body * timing.body_tokens + head * timing.head_tokens) / 1e9


def predictions(logprobs: list[list[float]], n_choices: int) -> list[int]:
    totals = [sum(lp) for lp in logprobs]
    return [
        max(range(n_choices), key=lambda c, s=s: totals[s + c]) for s in range(0, len(totals), n_choices)
    ]


def load_seconds(cache_dir: str | None) -> tuple[float, int]:
    """Model load time (imports excluded) and peak RSS (KiB) in a fresh process."""
    code = (
        "import time, resource, torch, transformers\n"
        "from dlngraph.runtime.models import load_causal_lm\n"
        "t = time.perf_counter(); load_causal_lm(); t = time.perf_counter() - t\n"
        "print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = dict(os.environ)
    if cache_dir is not None:
        env["DLNGRAPH_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def report_loads(skip_cold: bool) -> None:
    if not skip_cold:
        with tempfile.TemporaryDirectory() as empty:
            seconds, rss = load_seconds(empty)
        print(f"cold load (GGUF -> safetensors conversion): {seconds:6.1f} s   peak RSS {rss / 2**20:.2f} GiB")
    seconds, rss = load_seconds(None)
    print(f"warm load (cached safetensors):             {seconds:6.1f} s   peak RSS {rss / 2**20:.2f} GiB")


def best_of(run: Callable[[], Timing], repeats: int) -> Timing:
    """The fastest of `repeats` runs: on a shared machine, the least disturbed one."""
    return min((run() for _ in range(repeats)), key=lambda t: t.seconds)


def run_dtype(
    dtype: str, examples: list[tuple[str, str]], batch_size: int, methods: str, repeats: int
) -> dict[int, dict[str, Any]]:
    backend = CountingBackend(TorchBackendSpec(dtype=dtype, batch_size=batch_size))
    backend.model  # noqa: B018 - load before timing
    peak = matmul_gflops(backend.dtype)
    print(f"\n{dtype}: matmul 2048^3 {peak:7.1f} GFLOP/s")
    results: dict[int, dict[str, Any]] = {}
    for n_choices, choices in CHOICES.items():
        requests = [
            ScoreRequest(prompt=text, continuation=" " + c, prefix=INSTRUCTION) for text, _ in examples for c in choices
        ]
        runs: dict[str, Callable[[], Timing]] = {
            "a": lambda: score_one_by_one(backend, requests),
            "b": lambda: score_padded(backend, requests, batch_size),
            "c": lambda: score_reused(backend, requests),
        }
        score_reused(backend, requests[: 2 * n_choices])  # warm up the path
        timings: dict[str, Timing] = {}
        if "c" in methods:  # first, so the peak RSS printed after it is the backend's own
            timings["c"] = best_of(runs["c"], repeats)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"  peak RSS so far (model + (c)): {rss / 2**20:.2f} GiB")
        timings.update({name: best_of(runs[name], repeats) for name in methods if name != "c"})
        timings = {name: timings[name] for name in methods}
        labels = [choices.index(label) for _, label in examples]
        print(f"  {n_choices} choices, {len(examples)} examples ({len(requests)} requests)")
        for name, t in timings.items():
            rate = len(examples) / t.seconds
            gflops = model_gflop(backend, t) / t.seconds
            acc = sum(p == y for p, y in zip(predictions(t.logprobs, n_choices), labels)) / len(labels)
            drift = max(abs(x - y) for lp, ref in zip(t.logprobs, timings[methods[0]].logprobs) for x, y in zip(lp, ref))
            print(
                f"    ({name}) {rate:7.2f} ex/s  {t.body_tokens:7d} tokens  {gflops:6.1f} GFLOP/s "
                f"({gflops / peak:4.0%} of matmul)  accuracy {acc:.2f}  max |dlogp| vs ({methods[0]}) {drift:.1e}"
            )
        for name in methods[1:]:
            print(f"    ({name})/({methods[0]}) = {timings[methods[0]].seconds / timings[name].seconds:.2f}x")
        results[n_choices] = {"timings": timings, "predictions": predictions(timings["c"].logprobs, n_choices) if "c" in timings else None}
    backend.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default="abc", help="subset of abc to run")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=1, help="time each method N times, keep the fastest")
    parser.add_argument("--skip-cold", action="store_true", help="skip the one-time GGUF conversion timing")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    report_loads(args.skip_cold)
    examples = make_examples(args.examples)
    by_dtype = {d: run_dtype(d, examples, args.batch_size, args.methods, args.repeats) for d in args.dtypes.split(",")}
    if {"float32", "bfloat16"} <= set(by_dtype) and "c" in args.methods:
        print()
        for n_choices in CHOICES:
            fp32 = by_dtype["float32"][n_choices]
            bf16 = by_dtype["bfloat16"][n_choices]
            same = sum(a == b for a, b in zip(fp32["predictions"], bf16["predictions"])) / len(examples)
            drift = max(
                abs(x - y)
                for lp, ref in zip(bf16["timings"]["c"].logprobs, fp32["timings"]["c"].logprobs)
                for x, y in zip(lp, ref)
            )
            speed = fp32["timings"]["c"].seconds / bf16["timings"]["c"].seconds
            print(
                f"bfloat16 vs float32, {n_choices} choices, (c): same choice on {same:.0%} of examples, "
                f"max |dlogp| {drift:.2f}, {speed:.2f}x faster"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\npeak RSS of this process: {rss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
