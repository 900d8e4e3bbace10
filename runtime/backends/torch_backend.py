"""The torch backend: a transformers causal LM on CPU or GPU, batched.

Scoring never recomputes what it has already seen (CPU inference is
compute-bound, so the wins come from skipping work, not from batching):
requests are grouped by their shared `prefix`, whose KV cache is computed once
and expanded over the batch; requests that also share the prompt (the choices
of one example) encode that prompt once and score every continuation from its
cache. Every path tokenizes prefix, prompt and continuation separately and
joins the ids (`encode`), so reuse never changes results.

Only the positions whose next-token distribution is needed go through the
output projection (a third of the 135M model's weights).

It is also the one K/V-prefix engine (`KVPrefixScoring`): a Deep-Thinking layer
builds its state with `kv_forward` and `hold`s it; a request naming the state
(`ScoreRequest.state`) is read after it like after any other prefix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from transformers import DynamicCache

from dlngraph.capabilities import Capability
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import (
    BackendBase,
    GenerateRequest,
    Generation,
    Score,
    ScoreRequest,
)
from dlngraph.runtime.backends.static_decode import StaticDecoder
from dlngraph.runtime.kv_state import KVState, forward_with_cache
from dlngraph.runtime.models import ModelSource, load_causal_lm, pick_device
from dlngraph.spec import TorchBackendSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

CPU_BATCH = 16  # rows per forward on CPU: compute-bound, bigger batches buy nothing
GPU_MAX_BATCH = 256  # beyond this a 135M model's step is no faster per row
GPU_MEMORY_SHARE = 0.5  # of the free memory one batch may plan to use


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class Encoded:
    """Token ids of one scoring request, each part tokenized on its own."""

    prefix: tuple[int, ...]
    prompt: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, *self.prompt, *self.continuation]


def select_cache(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache holding rows `index` of `cache` (the model appends to caches in place)."""
    out = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
    return out


class TorchBackend(BackendBase):
    kind: ClassVar[str] = "torch"
    capabilities = frozenset(Capability)

    def __init__(self, spec: TorchBackendSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or TorchBackendSpec()
        # Resolving the source checks the model path now and keys the cache
        # without loading any weights (a fully cached run never loads them).
        self.source = ModelSource.resolve(self.spec.model)
        # Only "auto" is resolved now: an explicit "cuda" on a machine without one
        # fails when the weights load, as before, so compiling such a spec works.
        self.device_name = pick_device("auto") if self.spec.device == "auto" else self.spec.device
        self.dtype_name = resolve_dtype(self.spec.dtype, self.device_name)
        mode = "chat" if self.spec.chat else "plain"
        self.identity = f"{self.source.identity}|{self.dtype_name}|{mode}"
        self._loaded: tuple[Any, Any] | None = None
        self._decoder: StaticDecoder | None = None
        self._compile_failed = False
        self._held: dict[str, tuple[str, KVState]] = {}  # owner -> (digest, snapshot of its state)

    # ------------------------------------------------------------------ model

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = _shared_model(self.spec.model, self.device_name, self.dtype_name)
        return self._loaded

    @property
    def model(self) -> Any:
        return self._load()[0]

    @property
    def tokenizer(self) -> Any:
        return self._load()[1]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def tokenizer_name(self) -> str:
        return Path(str(self.tokenizer.name_or_path)).name

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def close(self) -> None:
        self._loaded = None

    def rows_per_batch(self, tokens_per_row: int) -> int:
        """Rows one forward takes: the spec's `batch_size` if set; else 16 on CPU,
        and on CUDA as many as half the free memory holds for rows of this length
        (KV cache, activations and the logits of every position, per token)."""
        if self.spec.batch_size is not None:
            return self.spec.batch_size
        if self.device.type != "cuda":
            return CPU_BATCH
        free, _total = torch.cuda.mem_get_info(self.device)
        return max(CPU_BATCH, min(GPU_MAX_BATCH, int(free * GPU_MEMORY_SHARE) // self._bytes_per_row(tokens_per_row)))

    def _bytes_per_row(self, tokens: int) -> int:
        config = self.model.config
        width = self.dtype.itemsize
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = 2 * config.num_hidden_layers * heads * head_dim * width
        # A layer's live activations: a few hidden-size and MLP-size vectors, and
        # one row of attention scores per head; logits are fp32 log-probs.
        activations = (4 * config.hidden_size + 3 * config.intermediate_size) * width
        scores = config.num_attention_heads * tokens * 4
        logits = 2 * config.vocab_size * 4
        return max(1, tokens * (kv + activations + scores + logits))

    # ------------------------------------------------------------------ tokens

    def token_ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def _chat(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )

    def prompt_text(self, text: str) -> str:
        """What the model reads for a generation prompt (chat-wrapped if asked)."""
        return self._chat(text) if self.spec.chat else text

    def encode(self, request: ScoreRequest) -> Encoded:
        """The ids every scoring path uses: prefix, prompt, continuation apart."""
        prefix, prompt = request.prefix, request.prompt
        if self.spec.chat and not request.state:  # a state was built from plain text: read on plainly
            # The chat head joins the shared prefix, the tail joins the prompt
            # (a template that rewrites the message shares nothing).
            user = prefix + prompt
            wrapped = self._chat(user)
            at = wrapped.find(user) if user else -1
            prefix, prompt = (wrapped[:at] + prefix, wrapped[at + len(prefix) :]) if at >= 0 else ("", wrapped)
        encoded = Encoded(self.token_ids(prefix), self.token_ids(prompt), self.token_ids(request.continuation))
        if not encoded.prefix and not encoded.prompt:
            # The first continuation token needs something to be predicted from
            # (a held state keeps no logits, only keys and values).
            if request.state:
                raise RuntimeFailure("a request read after a K/V state needs a prompt")
            encoded = Encoded((), self._start_ids(), encoded.continuation)
        return encoded

    def _start_ids(self) -> tuple[int, ...]:
        start = self.tokenizer.bos_token_id
        return (self.tokenizer.eos_token_id if start is None else start,)

    def check_context(self, length: int, what: str = "a request", *, node: str | None = None,
                      hint: str = "shorten the template or the inputs, or use a model with a longer context") -> None:
        if length > self.context_length:
            raise RuntimeFailure(
                f"{what} is {length} tokens long, more than the model's context of {self.context_length} tokens",
                node=node,
                hint=hint,
            )

    # ------------------------------------------------------------------ forward

    def _hidden(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        out, cache = forward_with_cache(
            self.model.base_model, ids, mask, positions, cache if cache is not None else DynamicCache()
        )
        return out.last_hidden_state, cache

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        return torch.log_softmax(logits.float(), dim=-1)

    def _pad(self, rows: Sequence[Sequence[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    # ------------------------------------------------------------------ score

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        started = time.perf_counter()
        encoded = [self.encode(r) for r in requests]
        states = {r.state: self._held_state(r.state) for r in requests if r.state}
        for r, e in zip(requests, encoded):
            self.check_context((states[r.state].length if r.state else 0) + len(e.ids))
        results: list[Score | None] = [None] * len(requests)
        by_prefix: dict[tuple[str, tuple[int, ...]], dict[tuple[int, ...], list[int]]] = {}
        for i, (r, e) in enumerate(zip(requests, encoded)):
            by_prefix.setdefault((r.state, e.prefix), {}).setdefault(e.prompt, []).append(i)
        with torch.inference_mode():
            for (state, prefix), examples in by_prefix.items():
                prefix_cache, n_prefix = self._prefix_cache(states.get(state), prefix)
                # Similar lengths batch together, so little of a batch is padding.
                ordered = sorted(examples.items(), key=lambda item: len(item[0]))
                longest = max(len(p) + len(encoded[i].continuation) for p, idxs in ordered for i in idxs)
                for chunk in chunks(ordered, self.rows_per_batch(n_prefix + longest)):
                    self._score_examples(n_prefix, prefix_cache, chunk, encoded, results)
        self.usage.calls += 1
        self.usage.requests += len(requests)
        self.usage.prompt_tokens += sum(len(e.prefix) + len(e.prompt) for e in encoded)
        self.usage.completion_tokens += sum(len(e.continuation) for e in encoded)
        self.usage.seconds += time.perf_counter() - started
        return [r for r in results if r is not None]

    def _prefix_cache(self, state: KVState | None, prefix: tuple[int, ...]) -> tuple[DynamicCache | None, int]:
        """The cache of `state` then `prefix` (either may be empty), and its length."""
        cache = state.cache(dtype=self.dtype, device=self.device) if state is not None else None
        offset = state.length if state is not None else 0
        if prefix:
            ids = torch.tensor([prefix], dtype=torch.long)
            mask = torch.ones(1, offset + len(prefix), dtype=torch.long)
            _, cache = self._hidden(ids, mask, offset + torch.arange(len(prefix))[None], cache)
        return cache, offset + len(prefix)

    def _score_examples(
        self,
        n_prefix: int,
        prefix_cache: DynamicCache | None,
        examples: Sequence[tuple[tuple[int, ...], list[int]]],
        encoded: list[Encoded],
        results: list[Score | None],
    ) -> None:
        """One pass over the prompts (right-padded, on the shared prefix), then one
        pass over every continuation on a copy of its own example's cache."""
        prompts = [p for p, _ in examples]
        ids, mask = self._pad(prompts)
        batch = len(prompts)
        cache = None
        if prefix_cache is not None:
            cache = select_cache(prefix_cache, torch.zeros(batch, dtype=torch.long, device=self.device))
        full_mask = torch.cat([torch.ones(batch, n_prefix, dtype=torch.long), mask], dim=1)
        positions = n_prefix + torch.arange(ids.shape[1]).expand(batch, -1)
        hidden, cache = self._hidden(ids, full_mask, positions, cache)
        last = torch.tensor([len(p) - 1 for p in prompts], device=hidden.device)
        # Log-probs stay on the device; only the continuation tokens' values are
        # gathered and copied back (a GPU would otherwise copy rows x vocabulary).
        first = self._logprobs(hidden[torch.arange(batch, device=hidden.device), last])

        # One row per request: (example index, request index). Rows go in chunks:
        # each carries a copy of its example's cache.
        rows = [(b, i) for b, (_, idxs) in enumerate(examples) for i in idxs]
        longest = max(len(p) for p in prompts) + max(len(encoded[i].continuation) for _, i in rows)
        for part in chunks(rows, self.rows_per_batch(n_prefix + longest)):
            tails = [encoded[i].continuation[:-1] for _, i in part]
            later = None
            if any(tails):
                row_of = torch.tensor([b for b, _ in part])
                tail_ids, tail_mask = self._pad(tails)
                tail_full_mask = torch.cat([full_mask[row_of], tail_mask], dim=1)
                starts = torch.tensor([n_prefix + len(prompts[b]) for b, _ in part])
                tail_pos = starts[:, None] + torch.arange(tail_ids.shape[1])[None]
                tail_cache = select_cache(cache, row_of.to(self.device))
                later = self._logprobs(self._hidden(tail_ids, tail_full_mask, tail_pos, tail_cache)[0])
            heads = [(b, encoded[i].continuation[0]) for b, i in part if encoded[i].continuation]
            rest = [(r, j, tok) for r, (_, i) in enumerate(part) for j, tok in enumerate(encoded[i].continuation[1:])]
            head_values = iter(_gather(first, heads))
            rest_values = iter(_gather(later, rest)) if later is not None else iter(())
            for b, i in part:
                cont = encoded[i].continuation
                values = [next(head_values)] if cont else []
                values.extend(next(rest_values) for _ in cont[1:])
                results[i] = Score(tuple(values), prompt_tokens=n_prefix + len(prompts[b]))

    # ------------------------------------------------------------------ K/V states

    def kv_forward(self, ids: Sequence[int], past: KVState | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values (fp32, per layer) of `ids` read after `past` (None: from the start)."""
        offset = past.length if past is not None else 0
        with torch.no_grad():  # not inference_mode: the caller updates these tensors in place
            cache, _ = self._prefix_cache(past, tuple(ids))
        assert cache is not None, "kv_forward needs ids"
        return [x.keys[:, :, offset:].float() for x in cache.layers], [x.values[:, :, offset:].float() for x in cache.layers]

    def hold(self, owner: str, state: KVState) -> str:
        """Keep a snapshot of `state` for score requests naming it by the returned
        content digest. An owner holds one state (memory stays bounded): this
        replaces its previous one."""
        digest = state.digest()
        if self._held.get(owner, ("",))[0] != digest:
            self._held[owner] = (digest, state.clone())
        return digest

    def _held_state(self, digest: str) -> KVState:
        held = {d: state for d, state in self._held.values()}
        if digest not in held:
            raise RuntimeFailure(f"no K/V state {digest[:12]} is held by this backend", hint="hold it before scoring")
        return held[digest]

    # ------------------------------------------------------------------ generate

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        started = time.perf_counter()
        prompts = [self.token_ids(self.prompt_text(r.prompt)) or self._start_ids() for r in requests]
        for r, p in zip(requests, prompts):
            self.check_context(len(p) + r.max_tokens)
        samples = [(i, k) for i, r in enumerate(requests) for k in range(r.n)]
        texts: dict[tuple[int, int], tuple[str, int]] = {}
        longest = max(len(p) + r.max_tokens for p, r in zip(prompts, requests))
        with torch.inference_mode():
            for chunk in chunks(samples, self.rows_per_batch(longest)):
                texts.update(self._decode(chunk, requests, prompts))
        results = []
        for i, r in enumerate(requests):
            outs = [texts[(i, k)] for k in range(r.n)]
            results.append(
                Generation(
                    texts=tuple(t for t, _ in outs),
                    prompt_tokens=len(prompts[i]),
                    completion_tokens=sum(n for _, n in outs),
                )
            )
        self.usage.calls += 1
        self.usage.requests += len(requests)
        self.usage.prompt_tokens += sum(g.prompt_tokens for g in results)
        self.usage.completion_tokens += sum(g.completion_tokens for g in results)
        self.usage.seconds += time.perf_counter() - started
        return results

    def _decode(
        self, rows: Sequence[tuple[int, int]], requests: list[GenerateRequest], prompts: list[tuple[int, ...]]
    ) -> dict[tuple[int, int], tuple[str, int]]:
        decoder = self._static_decoder()
        if decoder is None or not decoder.compiled:
            return self._generate_rows(rows, requests, prompts, decoder)
        try:
            return self._generate_rows(rows, requests, prompts, decoder)
        except Exception as exc:  # noqa: BLE001 - torch.compile fails in many ways (no triton, old driver, ...)
            log.warning("compiled decoding failed (%s: %s); decoding eagerly from now on", type(exc).__name__, exc)
            self._compile_failed = True
            self._decoder = None
            return self._generate_rows(rows, requests, prompts, None)

    def _generate_rows(
        self,
        rows: Sequence[tuple[int, int]],
        requests: list[GenerateRequest],
        prompts: list[tuple[int, ...]],
        decoder: StaticDecoder | None,
    ) -> dict[tuple[int, int], tuple[str, int]]:
        """Decode a left-padded batch token by token. Rows sharing a prompt (the
        samples of a request, the K posterior samples of an example) prefill it once;
        its cache is copied to each of them. Each sampled row has its own seeded
        generator, so its sample does not depend on the batch around it.

        With a `decoder` the steps run over its static cache (CUDA graphs on a
        GPU); without, over a growing dynamic cache. Greedy batches pick on the
        device and copy back one id per row instead of every log-prob; text is
        decoded per step only for requests with stop sequences."""
        reqs = [requests[i] for i, _ in rows]
        distinct = sorted({prompts[i] for i, _ in rows})
        ids, mask = self._pad(distinct, left=True)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden, cache = self._hidden(ids, mask, positions, None)
        row_of = {prompt: n for n, prompt in enumerate(distinct)}
        expand = torch.tensor([row_of[prompts[i]] for i, _ in rows])
        mask, positions = mask[expand], positions[expand]
        logprobs = self._logprobs(hidden[:, -1])[expand.to(hidden.device)]
        steps = max(r.max_tokens for r in reqs)
        if decoder is not None:
            advance = decoder.session(cache, expand, mask, steps).step
        else:
            cache = select_cache(cache, expand.to(self.device))

            def advance(tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
                nonlocal mask, cache
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
                hidden, cache = self._hidden(tokens[:, None], mask, at, cache)
                return self._logprobs(hidden[:, -1])

        generators = [
            torch.Generator().manual_seed((r.seed * 1_000_003 + k) % (1 << 63)) for r, (_, k) in zip(reqs, rows)
        ]
        greedy = all(r.temperature <= 0 for r in reqs)
        eos = self.tokenizer.eos_token_id
        produced: list[list[int]] = [[] for _ in rows]
        texts: list[str | None] = [None for _ in rows]  # set once a stop sequence cut the text
        done = [False] * len(rows)
        for _step in range(steps):
            picks = logprobs.argmax(dim=-1).tolist() if greedy else None
            host = None if greedy else logprobs.cpu()
            step = torch.full((len(rows),), self.tokenizer.pad_token_id, dtype=torch.long)
            for b, r in enumerate(reqs):
                if done[b]:
                    continue
                token = picks[b] if picks is not None else _pick(host[b], r, generators[b])  # type: ignore[index]
                step[b] = token
                if token == eos:
                    done[b] = True
                    continue
                produced[b].append(token)
                if any(r.stop):
                    cut, hit = _apply_stop(self.tokenizer.decode(produced[b], skip_special_tokens=True), r)
                    texts[b], done[b] = (cut, True) if hit else (None, False)
                done[b] = done[b] or len(produced[b]) >= r.max_tokens
            if all(done):
                break
            positions = positions[:, -1:] + 1
            logprobs = advance(step, positions)
        return {
            row: (texts[b] if texts[b] is not None else self.tokenizer.decode(produced[b], skip_special_tokens=True),
                  len(produced[b]))
            for b, row in enumerate(rows)
        }

    def _static_decoder(self) -> StaticDecoder | None:
        """The compiled static-cache decoder on CUDA when the spec allows it;
        None elsewhere (CPU decoding gains nothing from it: it is compute-bound)."""
        if self._decoder is None and self.spec.compile and not self._compile_failed and self.device.type == "cuda":
            self._decoder = StaticDecoder(self.model, compiled=True)
        return self._decoder


_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def _shared_model(model: str, device: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer), loaded once per process: backends naming the same
    weights share them (read-only: inference never changes them)."""
    key = (model, device, dtype)
    with _MODELS_LOCK:
        if key not in _MODELS:
            started = time.perf_counter()
            lm, tokenizer, _ = load_causal_lm(model, device, dtype)
            _MODELS[key] = (lm, tokenizer)
            log.info("loaded %s (%s, %s) in %.1f s", model, device, dtype, time.perf_counter() - started)
        return _MODELS[key]


def _gather(values: torch.Tensor, points: Sequence[tuple[int, ...]]) -> list[float]:
    """`values[point]` for every point (one index per dimension), in one copy to the host."""
    if not points:
        return []
    index = torch.tensor(points, dtype=torch.long, device=values.device)
    return values[tuple(index.T)].tolist()


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto': bfloat16 on CUDA (half the bytes per step, tensor cores), float32
    on CPU (bfloat16 matmuls are slower there and change more choices)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def _pick(logprobs: torch.Tensor, request: GenerateRequest, generator: torch.Generator) -> int:
    if request.temperature <= 0:
        return int(torch.argmax(logprobs))
    probs = torch.softmax(logprobs / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < request.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _apply_stop(text: str, request: GenerateRequest) -> tuple[str, bool]:
    """Cut `text` at the earliest stop sequence; say whether one was hit."""
    hits = [at for s in request.stop if s and (at := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
