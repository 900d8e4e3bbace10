"""Decoding over a preallocated (static) KV cache, compiled to CUDA graphs on a GPU.

Eager transformers decoding of a small model is bound by kernel launches, not
by the GPU: every step launches a few hundred kernels (about 15 per decoder
layer), each costing microseconds of CPU time, while the 135M model's weights
stream through memory in well under a millisecond. A static cache keeps every
tensor's shape and address fixed from step to step, which is what
`torch.compile(mode="reduce-overhead")` needs to record one step as a CUDA
graph and replay it with a single launch.

`StaticDecoder.session(prefill, rows, mask, new_tokens)` copies a prefilled
dynamic cache (one row per distinct prompt) into a static cache with one row
per sample, and returns a `DecodeSession` whose `step` feeds one token per row
and returns the next-token log-probs. The attention mask spans the whole static
cache (slots not yet written are 0), so no shape changes between steps; cache
lengths are rounded up to `BUCKET` so one recorded graph serves many calls.
Eager (`compiled=False`) it runs the same arithmetic as the dynamic path, which
is how the CPU tests check it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from dlngraph.runtime.kv_state import cache_keyword

BUCKET = 128  # cache lengths are multiples of this: fewer distinct graphs to record
KEPT_CACHES = 4  # static caches kept for reuse (each shape has its own graph)


class StaticDecoder:
    def __init__(self, model: Any, *, compiled: bool) -> None:
        self.model = model
        self.compiled = compiled
        self._caches: OrderedDict[tuple[int, int], StaticCache] = OrderedDict()
        self._keyword = cache_keyword(type(model.base_model).forward)
        self._step = (
            torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if compiled else self._forward
        )

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        # Inputs are on the device already and the cache keyword was looked up
        # once: nothing here that torch.compile would have to break its graph for.
        out = self.model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._keyword: cache}
        )
        logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1])
        return torch.log_softmax(logits.float(), dim=-1)

    def _cache(self, batch: int, length: int) -> StaticCache:
        key = (batch, length)
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            while len(self._caches) >= KEPT_CACHES:
                self._caches.popitem(last=False)
        else:
            cache.reset()
        self._caches[key] = cache
        return cache

    def session(self, prefill: DynamicCache, rows: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> "DecodeSession":
        """A session decoding `len(rows)` rows: row i continues prompt `rows[i]` of
        `prefill`; `mask` is the rows' own (left-padded) attention mask."""
        device = self.model.device
        batch, width = len(rows), mask.shape[1]
        length = -(-(width + new_tokens) // BUCKET) * BUCKET
        cache = self._cache(batch, length)
        index = rows.to(device)
        for layer, source in zip(cache.layers, prefill.layers):
            layer.update(source.keys.index_select(0, index), source.values.index_select(0, index))
        full = torch.zeros(batch, length, dtype=torch.long)
        full[:, :width] = mask
        return DecodeSession(self, cache, full.to(device), width)


class DecodeSession:
    def __init__(self, decoder: StaticDecoder, cache: StaticCache, mask: torch.Tensor, width: int) -> None:
        self.decoder = decoder
        self.cache = cache
        self.mask = mask
        self.next_slot = width

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Log-probs [rows, vocab] after feeding `tokens` [rows] at `positions` [rows, 1].
        With CUDA graphs the result lives in a buffer the next step overwrites: read it first."""
        device = self.mask.device
        self.mask[:, self.next_slot] = 1
        self.next_slot += 1
        return self.decoder._step(tokens[:, None].to(device), self.mask, positions.to(device), self.cache)
