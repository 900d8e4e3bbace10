"""One fit iteration with the batched backward schedule vs one call per request.

Runs `Trainer.step` (forward + the whole variational backward pass) twice on the
same mini-batch, prompts and seed, on the embedded model without a cache:

- batched: the plan's schedule, ONE backend call per (backend, op, purpose) per
  stage (posterior sampling B x K, child re-scoring, proposals, N x B scoring);
- unbatched: the same requests, but each sent in its own call, i.e. one call per
  (example, candidate), as a naive loop would (no batching, no shared-prefix reuse).

Prints model calls and seconds of each and their ratios, under the calls and
requests the plan lists for one iteration (the batched run makes exactly the
plan's calls; requests at most the plan's, duplicates sent once).

    python benchmarks/backward_batching.py --spec specs/dln2-subj.yaml --batch-size 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dlngraph.api import compile_spec
from dlngraph.runtime.backends.base import GenerateRequest, Generation, Score, ScoreRequest
from dlngraph.runtime.backends.torch_backend import TorchBackend
from dlngraph.runtime.backward import rng_for
from dlngraph.runtime.data import read_jsonl
from dlngraph.runtime.trainer import Trainer


class OneCallPerRequest:
    """The backend, asked one request at a time."""

    def __init__(self, inner: TorchBackend) -> None:
        self.inner = inner
        self.usage = inner.usage

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        return [self.inner.generate([r])[0] for r in requests]

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        return [self.inner.score([r])[0] for r in requests]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def one_iteration(plan, backend, batch: list[dict], indices: list[int]) -> tuple[int, int, float, dict]:  # noqa: ANN001
    trainer = Trainer(plan, {n.backend: backend for n in plan.nodes.values()}, seed=plan.spec.train.seed)
    calls_before, requests_before = backend.usage.calls, backend.usage.requests
    started = time.perf_counter()
    result = trainer.step({}, batch, indices, iteration=1)  # the spec's parameters
    seconds = time.perf_counter() - started
    return backend.usage.calls - calls_before, backend.usage.requests - requests_before, seconds, result.prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=Path(__file__).resolve().parents[1] / "specs" / "dln2-subj.yaml")
    parser.add_argument("--batch-size", type=int, default=None, help="examples (default: the spec's)")
    args = parser.parse_args()

    plan = compile_spec(args.spec)
    train = plan.spec.train
    examples = read_jsonl(plan.data_paths["train"], [*plan.spec.inputs, *plan.spec.outputs.values()])
    size = args.batch_size or train.batch_size
    indices = sorted(rng_for(train.seed, 1, "batch").sample(range(len(examples)), size))
    batch = [examples[i] for i in indices]
    backend_spec = plan.spec.backends[next(iter(plan.nodes.values())).backend]
    backend = TorchBackend(backend_spec)
    backend.model  # noqa: B018 - load the weights before timing

    print(f"{plan.name}: B={size}, N={train.prompt_proposals}, K={train.posterior_samples}, no cache")
    batched = one_iteration(plan, backend, batch, indices)
    unbatched = one_iteration(plan, OneCallPerRequest(backend), batch, indices)
    print(f"{'schedule':<22}{'model calls':>12}{'requests':>10}{'seconds':>10}")
    planned = plan.estimate_per_iteration
    print(f"{'the plan lists':<22}{planned.calls:>12}{planned.requests:>10}{'':>10}")
    for label, (calls, requests, seconds, _) in (("batched (plan)", batched), ("one call per request", unbatched)):
        print(f"{label:<22}{calls:>12}{requests:>10}{seconds:>10.1f}")
    print(f"calls ratio: {unbatched[0] / batched[0]:.1f}x fewer; wall-time ratio: {unbatched[2] / batched[2]:.2f}x faster")
    print(f"same prompts chosen: {batched[3] == unbatched[3]}")


if __name__ == "__main__":
    main()
