"""A separate proposer (`train.proposer`): prompt proposals written by one real
backend, the task scored by another. The task runs on the embedded model
(torch); the proposer is llama.cpp's server serving the same GGUF through
litellm, started and stopped here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from servers import LITELLM_MODEL, LlamaServer, needs_server

pytestmark = [pytest.mark.server, pytest.mark.model, needs_server, pytest.mark.timeout(600)]

DATA = Path(__file__).resolve().parents[1] / "specs" / "data" / "mpqa"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with LlamaServer(tmp_path_factory.mktemp("server-logs"), threads=1) as running:
        yield running


def test_proposals_come_from_the_proposer_backend(server: LlamaServer, tmp_path: Path, torch_backend: Any) -> None:
    from dlngraph.api import compile_spec, fit
    from dlngraph.runtime.backends.registry import open_backends

    for split, count in (("train", 8), ("dev", 4)):
        rows = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = {
        "name": "proposer",
        "backends": {
            "local": {"kind": "torch"},
            "writer": {"kind": "litellm", "model": LITELLM_MODEL, "api_base": server.api_base, "capabilities": ["generate"]},
        },
        "default_backend": "local",
        "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "inputs": ["input"],
        "nodes": {"answer": {
            "prompt": "Is the phrase negative or positive?",
            "template": "{{ prompt }}\n\n{{ input }}\nAnswer:",
            "output": {"type": "choice", "choices": ["negative", "positive"]},
        }},
        "outputs": {"answer": "target"},
        "train": {"iterations": 1, "batch_size": 4, "prompt_proposals": 3, "proposal_max_tokens": 16,
                  "dev_size": 4, "proposer": "writer"},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    plan = compile_spec(path)
    assert plan.nodes["answer"].proposer == "writer"
    [proposals] = [c for s in plan.backward for c in s.calls if c.purpose == "prompt_proposals"]
    assert proposals.backend == "writer" and proposals.requests == 2

    backends = open_backends(plan, cache_dir=tmp_path / "cache")
    assert set(backends) == {"local", "writer"}
    result = fit(plan, out=tmp_path / "run", backends=backends)
    assert result.iterations == 1
    writer = backends["writer"].usage
    assert writer.calls == 1 and writer.requests == 2  # the proposals, one batched call, nothing else
    assert writer.completion_tokens > 0
    assert backends["local"].usage.calls >= 3  # forward, candidate scoring, dev evaluations
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[1]["dropped_proposals"]["answer"]) == {"empty", "duplicate", "scaffolding"}
