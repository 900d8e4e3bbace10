"""Shared fixtures: the embedded model loaded once per session, a private cache.

`torch_backend` is the real embedded SmolLM2-135M-Instruct behind the torch
backend (fp32, CPU unless a GPU is present). `device` parametrises a test over
"cpu" and "cuda" (marked `cuda`, skipped with the reason when torch sees no
GPU); `device_backend` is the embedded model on that device in its default
dtype (float32 on CPU, bfloat16 on CUDA). Torch backends built later in the
same process with the same model/device/dtype share its weights, so CLI tests
run in-process do not reload it. `cache_dir` / `response_cache` give each test
its own SQLite response cache, never the user's. `build_plan` makes a
forward-only ExecutionPlan from a Spec without the compiler (for runtime tests
that must not depend on compiler passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def torch_backend():  # -> TorchBackend (torch is imported lazily for non-model test runs)
    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    # float32 even on a GPU: the tests that use it compare to 1e-4 (see device_backend).
    backend = TorchBackend(TorchBackendSpec(batch_size=8, dtype="float32"))
    backend.model  # noqa: B018 - load the weights once, here
    return backend


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (skipped when torch sees none)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    return request.param


@pytest.fixture
def device_backend(device: str, torch_backend):  # -> TorchBackend on `device`, default dtype
    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    if torch_backend.device.type == device == "cpu":
        return torch_backend  # the default dtype on CPU is its float32
    return TorchBackend(TorchBackendSpec(device=device, batch_size=8))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A fresh directory for the SQLite response cache (created on first use)."""
    return tmp_path / "cache"


@pytest.fixture
def response_cache(cache_dir: Path) -> Iterator:
    from dlngraph.runtime.cache import Cache

    cache = Cache(cache_dir)
    yield cache
    cache.close()


@pytest.fixture
def build_plan() -> Callable:
    """`build_plan(spec, spec_path=Path("spec.yaml"))` -> a forward-only ExecutionPlan."""
    import jinja2
    import networkx as nx
    from jinja2 import meta

    from dlngraph.compiler.plan import ExecutionPlan, NodeKind, PlanNode, Stage

    def build(spec, spec_path: Path = Path("spec.yaml")) -> ExecutionPlan:
        env = jinja2.Environment()
        graph = nx.DiGraph()
        variables = {}
        for name, node in spec.nodes.items():
            variables[name] = meta.find_undeclared_variables(env.parse(node.template)) - {"prompt"}
            graph.add_node(name)
            graph.add_edges_from((p, name) for p in variables[name] & set(spec.nodes))
        nodes = {
            name: PlanNode(
                name=name,
                kind=NodeKind(node.kind),
                backend=spec.backend_of(name),
                backend_kind=spec.backends[spec.backend_of(name)].kind,
                output_type=node.output.type,
                choices=tuple(getattr(node.output, "choices", ())),
                parents=tuple(sorted(graph.predecessors(name))),
                inputs=tuple(sorted(variables[name] & set(spec.inputs))),
                children=tuple(sorted(graph.successors(name))),
                trainable=True,
                target=spec.outputs.get(name),
                spec=node,
            )
            for name, node in sorted(spec.nodes.items())
        }
        stages = tuple(Stage(i, tuple(sorted(g)), ()) for i, g in enumerate(nx.topological_generations(graph)))
        data = {split: (spec_path.parent / p).resolve() for split, p in spec.data.paths().items()}
        return ExecutionPlan(spec, spec_path, nodes, (), stages, (), data)

    return build
