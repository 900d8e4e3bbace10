"""Throughput of the litellm backend against local llama.cpp servers.

64 greedy generation requests (8 new tokens each) at concurrency 1 and 8, on
one server and on two servers behind a litellm Router. For each setting it
prints requests/second, how the calls were spread over the servers, and the
overhead of dlngraph's layer (LiteLLMBackend: semaphore, tenacity retries,
usage and cost accounting) over raw `litellm.atext_completion` calls making
the same requests with the same concurrency (target: under 5% of wall time).
Each side is timed alternately `--repeats` times and its fastest run kept.

On a 2-core machine one llama.cpp server handles one request at a time and two
servers share the same cores, so neither concurrency nor a second server is
expected to speed anything up here: the Router's value on this machine is the
spread and the failover. Its throughput scaling needs more cores or GPUs,
where each server has its own.

Run:  python benchmarks/litellm_throughput.py   (needs `pip install -e '.[server]'`)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the server helper lives with the tests

from servers import LITELLM_MODEL, llama_servers  # noqa: E402

from dlngraph.runtime.backends.base import GenerateRequest  # noqa: E402
from dlngraph.runtime.backends.litellm_backend import LiteLLMBackend, import_litellm, run_async  # noqa: E402
from dlngraph.spec import Deployment, LiteLLMBackendSpec  # noqa: E402

TOPICS = ["rivers", "clocks", "bread", "stars", "glass", "maps", "owls", "salt"]


def requests(count: int, max_tokens: int) -> list[GenerateRequest]:
    return [
        GenerateRequest(f"Question {i}: name one thing about {TOPICS[i % len(TOPICS)]}.\nAnswer:", max_tokens=max_tokens)
        for i in range(count)
    ]


def spec_for(bases: list[str], concurrency: int) -> LiteLLMBackendSpec:
    if len(bases) == 1:
        return LiteLLMBackendSpec(model=LITELLM_MODEL, api_base=bases[0], concurrency=concurrency, capabilities=["generate"])
    return LiteLLMBackendSpec(
        model=LITELLM_MODEL,
        deployments=[Deployment(api_base=b) for b in bases],
        concurrency=concurrency,
        capabilities=["generate"],
    )


def time_dlngraph(spec: LiteLLMBackendSpec, batch: list[GenerateRequest]) -> tuple[float, Counter[str]]:
    backend = LiteLLMBackend(spec)
    started = time.perf_counter()
    backend.generate(batch)
    return time.perf_counter() - started, Counter(backend.routed)


def time_raw(spec: LiteLLMBackendSpec, batch: list[GenerateRequest]) -> float:
    """The same requests through plain litellm (or a plain Router), same concurrency."""
    litellm = import_litellm()
    if spec.deployments:
        router = litellm.Router(
            model_list=[
                {"model_name": spec.model, "litellm_params": {"model": spec.model, "api_base": d.api_base, "api_key": "x"}}
                for d in spec.deployments
            ],
            num_retries=0,
        )
        call = lambda **kw: router.atext_completion(model=spec.model, **kw)  # noqa: E731
    else:
        call = lambda **kw: litellm.atext_completion(model=spec.model, api_base=spec.api_base, api_key="x", **kw)  # noqa: E731

    async def gather() -> None:
        limit = asyncio.Semaphore(spec.concurrency)

        async def one(r: GenerateRequest) -> None:
            async with limit:
                await call(prompt=r.prompt, max_tokens=r.max_tokens, temperature=0.0, seed=r.seed)

        await asyncio.gather(*(one(r) for r in batch))

    started = time.perf_counter()
    run_async(gather())
    return time.perf_counter() - started


def client_overhead(batch: list[GenerateRequest], repeats: int) -> float:
    """Seconds per request dlngraph's layer adds over raw litellm, measured against a
    server that answers at once (tests/fake_openai.py), so server time cannot hide it."""
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        spec = spec_for([fake.api_base], 8)
        time_raw(spec, batch[:4])  # warm up clients
        ours = min(time_dlngraph(spec, batch)[0] for _ in range(repeats))
        raw = min(time_raw(spec, batch) for _ in range(repeats))
    return (ours - raw) / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per server")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the fastest counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batch = requests(args.requests, args.max_tokens)
    print(f"{args.requests} generation requests, {args.max_tokens} new tokens each, llama.cpp servers "
          f"with {args.threads} thread(s) serving the embedded SmolLM2 GGUF")
    per_request = client_overhead(batch, repeats=5)
    print(f"dlngraph's layer over raw litellm, against an instant server: {per_request * 1000:+.2f} ms per request")
    print(f"{'servers':>7} {'conc.':>5} {'req/s':>7} {'raw req/s':>9} {'overhead':>9} {'(wall)':>8}  spread over servers")
    with tempfile.TemporaryDirectory() as logs, llama_servers(Path(logs), count=2, threads=args.threads) as servers:
        bases = [s.api_base for s in servers]
        time_raw(spec_for(bases[:1], 1), batch[:2])  # warm up: server caches
        for count in (1, 2):
            for concurrency in (1, 8):
                spec = spec_for(bases[:count], concurrency)
                ours, raw, spread = [], [], Counter[str]()
                for _ in range(args.repeats):
                    seconds, spread = time_dlngraph(spec, batch)
                    ours.append(seconds)
                    raw.append(time_raw(spec, batch))
                # The layer's own cost as a share of this setting's wall time, and the
                # plain wall-time difference (noisy: it includes the server's variance).
                share = per_request * len(batch) / min(ours)
                wall = (min(ours) - min(raw)) / min(ours)
                shares = " / ".join(f"{spread[b]}" for b in bases[:count])
                print(f"{count:>7} {concurrency:>5} {len(batch) / min(ours):>7.2f} {len(batch) / min(raw):>9.2f} "
                      f"{share:>+9.2%} {wall:>+8.1%}  {shares}")
    print("overhead = the layer's per-request cost x requests / wall time (target < 5%); (wall) = plain "
          "difference of the fastest runs, mostly server noise.")
    print("note: 2 cores here: one llama.cpp server already uses them and two share them, so no speed-up "
          "from concurrency or a second server is expected; the Router shows here by spread and failover.")


if __name__ == "__main__":
    main()
