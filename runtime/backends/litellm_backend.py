"""The litellm backend: any provider litellm speaks to, or your own servers.

Each batch runs as asyncio tasks on one process-wide event loop (litellm keeps
its HTTP clients per loop), at most `concurrency` in flight. Every request is
retried by tenacity with exponential backoff and jitter on rate limits, 5xx,
timeouts and connection errors; every failed attempt counts against the
backend's `max_errors` budget, and a spent budget or a request out of retries
stops the run with a `RuntimeFailure` (the trainer checkpoints on that).

With several `deployments` the calls go through a litellm `Router`: it spreads
them over the servers and cools down a failing one, so a retry lands on a
healthy server.

Scoring: an endpoint whose echoed prompt log-probs passed the probe's
known-answer check (`Capability.SCORE`, e.g. vLLM) scores any continuation
exactly. Elsewhere (llama.cpp's server shifts echoed log-probs by one token)
only single-token choices are scored, from the top-k next-token log-probs of
one request per distinct prompt.

The API key is read from the environment variable the spec names when a call
is made; it is never stored in the spec, the cache, logs or the run directory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from dlngraph.capabilities import DECLARED, Capability
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends.base import (
    BackendBase,
    GenerateRequest,
    Generation,
    Score,
    ScoreRequest,
)
from dlngraph.spec import Deployment, LiteLLMBackendSpec

log = logging.getLogger(__name__)

# Local servers accept any key, but the OpenAI client insists on one.
PLACEHOLDER_KEY = "no-key"
MAX_BACKOFF = 30.0
# Alternatives asked for when scoring single-token choices, unless the spec says:
# an instruct model often ranks a bare label word in the hundreds (llama.cpp
# answers k=1000 in ~0.1 s); hosted completion APIs cap k at 5.
TOP_K_SERVER = 1000
TOP_K_HOSTED = 5


def import_litellm() -> Any:
    """litellm, imported on first use with its cost map read from the package (no fetch)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    # httpx clients are reused across calls; the aiohttp transport leaks sessions.
    litellm.disable_aiohttp_transport = True
    return litellm


# --------------------------------------------------------------------------- event loop

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def run_async(coro: Awaitable[Any]) -> Any:
    """Run `coro` on the shared background loop and wait for its result."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="dlngraph-litellm", daemon=True).start()
    future = asyncio.run_coroutine_threadsafe(coro, _LOOP)  # type: ignore[arg-type]
    try:
        return future.result()
    except BaseException:  # e.g. Ctrl-C in the caller: stop the batch too
        future.cancel()
        raise


# --------------------------------------------------------------------------- errors


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: rate limits, 5xx, timeouts, lost connections, no healthy deployment."""
    litellm = import_litellm()
    from litellm.types.router import RouterRateLimitError

    transient = (
        litellm.RateLimitError,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
        litellm.BadGatewayError,
        litellm.APIConnectionError,
        litellm.Timeout,
        RouterRateLimitError,
    )
    if isinstance(exc, transient):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def describe(exc: BaseException) -> str:
    """One line naming the error (litellm's messages run long)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


# --------------------------------------------------------------------------- keys


def api_key(env: str | None, api_base: str | None) -> str | None:
    """The key from the named variable; a placeholder for a keyless local server;
    None lets litellm read the provider's own variable (OPENAI_API_KEY, ...)."""
    if env:
        value = os.environ.get(env)
        if not value:
            raise RuntimeFailure(
                f"the environment variable {env} named by `api_key_env` is not set",
                hint=f"export {env}=... before running (the key is never written to the spec or run files)",
            )
        return value
    return PLACEHOLDER_KEY if api_base else None


# --------------------------------------------------------------------------- transports

Send = Callable[..., Awaitable[Any]]


def direct_transport(spec: LiteLLMBackendSpec) -> Send:
    """One endpoint: litellm's text completion with the spec's model and base."""
    litellm = import_litellm()

    async def send(**params: Any) -> Any:
        return await litellm.atext_completion(
            model=spec.model,
            api_base=spec.api_base,
            api_key=api_key(spec.api_key_env, spec.api_base),
            timeout=spec.timeout,
            num_retries=0,  # tenacity retries; litellm must not retry underneath
            max_retries=0,
            **params,
        )

    return send


def router_transport(spec: LiteLLMBackendSpec) -> Send:
    """Several deployments of one model behind a litellm Router (shuffled by
    weight; a deployment that fails is cooled down and the retry goes elsewhere)."""
    litellm = import_litellm()
    router = litellm.Router(
        model_list=[router_entry(spec, d) for d in spec.deployments],
        routing_strategy="simple-shuffle",
        num_retries=0,
        allowed_fails=1,
        cooldown_time=spec.cooldown,
        timeout=spec.timeout,
    )

    async def send(**params: Any) -> Any:
        return await router.atext_completion(model=spec.model, **params)

    return send


def router_entry(spec: LiteLLMBackendSpec, deployment: Deployment) -> dict[str, Any]:
    return {
        "model_name": spec.model,
        "litellm_params": {
            "model": deployment.model or spec.model,
            "api_base": deployment.api_base,
            "api_key": api_key(deployment.api_key_env or spec.api_key_env, deployment.api_base),
            "weight": deployment.weight,
            "timeout": spec.timeout,
            "max_retries": 0,
        },
    }


# --------------------------------------------------------------------------- the backend


class LiteLLMBackend(BackendBase):
    kind: ClassVar[str] = "litellm"

    def __init__(self, spec: LiteLLMBackendSpec) -> None:
        super().__init__()
        from dlngraph.runtime.backends.probe import cached_capabilities

        self.spec = spec
        # The model string, not the server address: the same model on another
        # port or behind more deployments answers from the same cache entries.
        self.identity = f"litellm:{spec.model}"
        self.capabilities = cached_capabilities(spec) or DECLARED["litellm"]
        self.errors = 0
        self.routed: dict[str, int] = {}  # api_base -> successful requests
        self._send: Send | None = None
        self._tokenizer: Any = None

    @property
    def send(self) -> Send:
        if self._send is None:
            self._send = router_transport(self.spec) if self.spec.deployments else direct_transport(self.spec)
        return self._send

    # ------------------------------------------------------------------ requests

    async def request(self, params: dict[str, Any], limit: asyncio.Semaphore) -> Any:
        """One completion, retried on transient errors; every failure spends budget."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_random_exponential(multiplier=self.spec.backoff, max=MAX_BACKOFF),
            stop=stop_after_attempt(self.spec.max_retries + 1),
            reraise=True,
        )
        async with limit:
            try:
                async for attempt in retrying:
                    with attempt:
                        try:
                            response = await self.send(**params)
                        except Exception as exc:
                            self._spend_error(exc)
                            raise
            except RuntimeFailure:
                raise
            except Exception as exc:
                tried = f"after {self.spec.max_retries + 1} attempts" if is_transient(exc) else "(not retryable)"
                raise RuntimeFailure(
                    f"model {self.spec.model}: a request failed {tried}: {describe(exc)}",
                    hint=self._where_hint(),
                ) from exc
        self._account(response)
        return response

    def _spend_error(self, exc: BaseException) -> None:
        self.errors += 1
        log.warning("model %s: call failed (%d/%d errors): %s", self.spec.model, self.errors,
                    self.spec.max_errors, describe(exc))
        if self.errors > self.spec.max_errors:
            raise RuntimeFailure(
                f"model {self.spec.model}: {self.errors} failed calls, more than max_errors="
                f"{self.spec.max_errors}; last error: {describe(exc)}",
                hint=self._where_hint(),
            ) from exc

    def _where_hint(self) -> str:
        bases = [d.api_base for d in self.spec.deployments] or [self.spec.api_base or "the provider"]
        return (
            f"check that {', '.join(bases)} is up; answers received so far are in the response "
            "cache, so re-running (or `dlngraph fit --resume`) repeats no finished call"
        )

    def _account(self, response: Any) -> None:
        usage = getattr(response, "usage", None)
        self.usage.requests += 1
        self.usage.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
        self.usage.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        self.usage.cost += self._cost(response)
        hidden = getattr(response, "_hidden_params", None) or {}
        base = hidden.get("api_base") or self.spec.api_base or "default"
        self.routed[base] = self.routed.get(base, 0) + 1

    def _cost(self, response: Any) -> float:
        try:
            return float(import_litellm().completion_cost(completion_response=response) or 0.0)
        except Exception:  # a model missing from the cost map (local servers) costs nothing
            return 0.0

    def run_batch(self, jobs: list[dict[str, Any]]) -> list[Any]:
        """Run `jobs` concurrently; the first failure cancels the rest and is raised."""
        started = time.perf_counter()

        async def gather() -> list[Any]:
            limit = asyncio.Semaphore(self.spec.concurrency)
            tasks = [asyncio.ensure_future(self.request(params, limit)) for params in jobs]
            try:
                return await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()

        try:
            return run_async(gather())
        finally:
            self.usage.calls += 1
            self.usage.seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ generate

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        # n samples are n requests with derived seeds: servers differ in `n` support.
        jobs = [
            {
                "prompt": r.prompt,
                "max_tokens": r.max_tokens,
                "temperature": r.temperature,
                "top_p": r.top_p,
                "stop": list(r.stop) or None,
                "seed": r.seed * 1_000_003 + k,
                "drop_params": True,  # a provider without seed/top_p/stop still generates
            }
            for r in requests
            for k in range(r.n)
        ]
        responses = iter(self.run_batch(jobs))
        results = []
        for r in requests:
            mine = [next(responses) for _ in range(r.n)]
            results.append(
                Generation(
                    texts=tuple(m.choices[0].text or "" for m in mine),
                    prompt_tokens=int(getattr(mine[0].usage, "prompt_tokens", 0) or 0),
                    completion_tokens=sum(int(getattr(m.usage, "completion_tokens", 0) or 0) for m in mine),
                )
            )
        return results

    # ------------------------------------------------------------------ score

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        if Capability.SCORE in self._scoring_capabilities():
            return self._score_echo(requests)
        return self._score_top_k(requests)

    def _scoring_capabilities(self) -> frozenset[Capability]:
        if self.spec.capabilities is not None:
            return self.capabilities
        from dlngraph.runtime.backends.probe import probe_backend

        self.capabilities = probe_backend(self.spec)
        return self.capabilities

    def _score_echo(self, requests: list[ScoreRequest]) -> list[Score]:
        """Exact log-probs of any continuation from echoed prompt log-probs."""
        texts = [(r.prefix + r.prompt, r.continuation) for r in requests]
        jobs = [
            {"prompt": head + tail, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
            for head, tail in texts
        ]
        return [
            continuation_score(response, len(head), len(head) + len(tail))
            for response, (head, tail) in zip(self.run_batch(jobs), texts)
        ]

    def _score_top_k(self, requests: list[ScoreRequest]) -> list[Score]:
        """Single-token continuations from one top-k request per distinct prompt."""
        self._check_single_tokens(requests)
        own_servers = bool(self.spec.api_base or self.spec.deployments)
        k = self.spec.top_logprobs or (TOP_K_SERVER if own_servers else TOP_K_HOSTED)
        # A server that stops at once returns no log-probs; llama.cpp and vLLM take
        # min_tokens (llama.cpp still reports the unmasked distribution).
        extra = {"extra_body": {"min_tokens": 1}} if own_servers else {}
        prompts = sorted({r.prefix + r.prompt for r in requests})
        jobs = [{"prompt": p, "max_tokens": 1, "temperature": 0.0, "logprobs": k, **extra} for p in prompts]
        replies = dict(zip(prompts, self.run_batch(jobs)))
        alternatives = {p: top_alternatives(reply) for p, reply in replies.items()}
        return [
            Score(
                (choice_logprob(alternatives[r.prefix + r.prompt], r.continuation),),
                prompt_tokens=int(getattr(replies[r.prefix + r.prompt].usage, "prompt_tokens", 0) or 0),
            )
            for r in requests
        ]

    def _check_single_tokens(self, requests: list[ScoreRequest]) -> None:
        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            return
        long = sorted(
            {r.continuation for r in requests if len(tokenizer(r.continuation, add_special_tokens=False)["input_ids"]) != 1}
        )
        if long:
            raise RuntimeFailure(
                f"model {self.spec.model}: continuation(s) {', '.join(map(repr, long))} are not single "
                "tokens, and this endpoint cannot score multi-token continuations (its echoed prompt "
                "log-probs failed the probe, or it has none)",
                hint="use single-token choices (e.g. ' A' / ' B'), a server that scores prompts "
                "correctly (vLLM), or a `kind: torch` backend",
            )

    def _load_tokenizer(self) -> Any:
        if self.spec.tokenizer is None:
            return None
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec.tokenizer)
        return self._tokenizer


def load_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer a spec's `tokenizer:` names (a model directory or `embedded`)."""
    from transformers import AutoTokenizer

    from dlngraph.runtime.models import ModelSource, model_directory

    return AutoTokenizer.from_pretrained(str(model_directory(ModelSource.resolve(name))))


# --------------------------------------------------------------------------- log-prob parsing


def top_alternatives(response: Any) -> dict[str, float]:
    """token text -> log-prob of the first generated position's top-k; empty when
    the server returned none (e.g. it stopped at once), which is still an answer."""
    logprobs = getattr(response.choices[0], "logprobs", None)
    top = getattr(logprobs, "top_logprobs", None) if logprobs is not None else None
    if not top or not top[0]:
        return {}
    out: dict[str, float] = {}
    for token, value in dict(top[0]).items():
        out[token] = max(out.get(token, -math.inf), float(value))
    return out


def choice_logprob(alternatives: dict[str, float], choice: str) -> float:
    """log p(choice) when it is among the alternatives, else an upper bound on it:
    no more than the least likely listed token, nor than the unlisted mass."""
    if choice in alternatives:
        return alternatives[choice]
    rest = 1.0 - sum(math.exp(v) for v in alternatives.values())
    bound = math.log(max(rest, 1e-12))
    return min([bound, *alternatives.values()])


def continuation_score(response: Any, start: int, end: int) -> Score:
    """Sum of the echoed log-probs of the tokens at character offsets [start, end)."""
    logprobs = response.choices[0].logprobs
    offsets = list(logprobs.text_offset)
    values = list(logprobs.token_logprobs)
    picked = tuple(float(v) for o, v in zip(offsets, values) if start <= o < end and v is not None)
    return Score(picked, prompt_tokens=sum(1 for o in offsets if o < start))

