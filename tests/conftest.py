"""Shared fixtures: the embedded model loaded once per session, a private cache.

`torch_backend` is the real embedded SmolLM2-135M-Instruct behind the torch
backend (fp32, CPU unless a GPU is present). Torch backends built later in the
same process with the same model/device/dtype share its weights, so CLI tests
run in-process do not reload it. `cache_dir` / `response_cache` give each test
its own SQLite response cache, never the user's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def torch_backend():  # -> TorchBackend (torch is imported lazily for non-model test runs)
    from dlngraph.runtime.backends.torch_backend import TorchBackend
    from dlngraph.spec import TorchBackendSpec

    backend = TorchBackend(TorchBackendSpec(batch_size=8))
    backend.model  # noqa: B018 - load the weights once, here
    return backend


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
