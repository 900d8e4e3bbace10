"""The litellm backend: any provider litellm speaks to, or your own servers.

Each batch runs as asyncio tasks on one process-wide event loop (litellm keeps
its HTTP clients per loop), at most `concurrency` in flight. Every request is
retried by tenacity with exponential backoff and jitter on rate limits, 5xx,
timeouts and connection errors, all within the spec's `timeout`: one deadline
per request, retries and backoff included, so a server that accepts and never
answers stops the batch after `timeout` seconds, not after `timeout` per
attempt. Every failed attempt counts against the backend's `max_errors`
budget, and a spent budget or a request out of retries stops the run with a
`RuntimeFailure` (the trainer checkpoints on that); when some answers of the
batch had arrived, it is a `PartialBatch` carrying them, for the cache.

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

`probing_resolver` and `token_counter` are the hooks the
compiler uses for litellm backends (probing only when asked); the checks
themselves are in `probe`, which does not import this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from dlngraph.capabilities import DECLARED, Capability
from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.backends import probe
from dlngraph.runtime.backends.base import (
    BackendBase,
    GenerateRequest,
    Generation,
    PartialBatch,
    Score,
    ScoreRequest,
)
from dlngraph.runtime.backends.replies import choice_logprob, continuation_score, describe, top_alternatives
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
    if isinstance(exc, (*transient, TimeoutError)):  # TimeoutError: our own per-request deadline
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


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

    async def send(timeout: float, **params: Any) -> Any:
        return await litellm.atext_completion(
            model=spec.model,
            api_base=spec.api_base,
            api_key=api_key(spec.api_key_env, spec.api_base),
            timeout=timeout,
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

    async def send(timeout: float, **params: Any) -> Any:
        return await router.atext_completion(model=spec.model, timeout=timeout, **params)

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

    def __init__(self, spec: LiteLLMBackendSpec, *, deadline: float | None = None) -> None:
        super().__init__()
        self.spec = spec
        # The model string, not the server address: the same model on another
        # port or behind more deployments answers from the same cache entries.
        self.identity = f"litellm:{spec.model}"
        self.capabilities = probe.cached_capabilities(spec) or DECLARED["litellm"]
        # A `time.monotonic()` no request may outlive (a probe's one overall budget).
        self.deadline = deadline
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
        """One completion, retried on transient errors within one deadline; every failure spends budget."""
        async with limit:  # the deadline starts when the request may be sent, not while it queues
            deadline = time.monotonic() + self.spec.timeout
            if self.deadline is not None:
                deadline = min(deadline, self.deadline)
            backoff = wait_random_exponential(multiplier=self.spec.backoff, max=MAX_BACKOFF)

            def wait(state: RetryCallState) -> float:
                return max(0.0, min(backoff(state), deadline - time.monotonic()))

            def stop(state: RetryCallState) -> bool:
                return state.attempt_number > self.spec.max_retries or time.monotonic() >= deadline

            retrying = AsyncRetrying(retry=retry_if_exception(is_transient), wait=wait, stop=stop, reraise=True)
            attempts = 0
            try:
                async for attempt in retrying:
                    with attempt:
                        attempts += 1
                        left = deadline - time.monotonic()
                        try:
                            if left <= 0:
                                raise TimeoutError("no time left before the deadline")
                            try:
                                # wait_for as well: litellm's own timeout does not bound every stage of a call.
                                response = await asyncio.wait_for(self.send(timeout=left, **params), left)
                            except TimeoutError:
                                raise TimeoutError(f"no answer within {left:.3g} s") from None
                        except Exception as exc:
                            self._spend_error(exc)
                            raise
            except RuntimeFailure:
                raise
            except Exception as exc:
                raise self._failure(exc, attempts) from exc
        self._account(response)
        return response

    def _failure(self, exc: Exception, attempts: int) -> RuntimeFailure:
        timed_out = isinstance(exc, (TimeoutError, import_litellm().Timeout))
        if timed_out or (self.deadline is not None and time.monotonic() >= self.deadline):
            what = f"no answer within {self.spec.timeout:g} s (the backend's `timeout`, retries included)"
            if self.deadline is not None:
                what = "no answer before the probe's deadline"
        else:
            tried = f"after {attempts} attempt{'s' * (attempts != 1)}" if is_transient(exc) else "(not retryable)"
            what = f"a request failed {tried}: {describe(exc)}"
        return RuntimeFailure(f"model {self.spec.model}: {what}", hint=self._where_hint())

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
        """Run `jobs` concurrently; the first failure cancels the rest and is raised, as
        a `PartialBatch` holding the replies (by job index) that had arrived."""
        started = time.perf_counter()
        self.send  # noqa: B018 - build the transport (importing litellm) before any deadline starts

        async def gather() -> list[Any]:
            limit = asyncio.Semaphore(self.spec.concurrency)
            tasks = [asyncio.ensure_future(self.request(params, limit)) for params in jobs]
            try:
                return await asyncio.gather(*tasks)
            except RuntimeFailure as failure:
                arrived = {
                    i: t.result() for i, t in enumerate(tasks) if t.done() and not t.cancelled() and t.exception() is None
                }
                raise PartialBatch(failure, arrived) from failure
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
        return self._answer(requests, jobs, _generations)

    # ------------------------------------------------------------------ score

    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        if Capability.SCORE in self._scoring_capabilities():
            return self._score_echo(requests)
        return self._score_top_k(requests)

    def _scoring_capabilities(self) -> frozenset[Capability]:
        if self.spec.capabilities is not None:
            return self.capabilities
        self.capabilities = probe_backend(self.spec)
        return self.capabilities

    def _score_echo(self, requests: list[ScoreRequest]) -> list[Score]:
        """Exact log-probs of any continuation from echoed prompt log-probs."""
        jobs = [
            {"prompt": r.prefix + r.prompt + r.continuation, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
            for r in requests
        ]

        def scores(requests: list[ScoreRequest], replies: dict[int, Any]) -> dict[int, Score]:
            return {
                i: continuation_score(replies[i], len(r.prefix + r.prompt), len(r.prefix + r.prompt + r.continuation))
                for i, r in enumerate(requests)
                if i in replies
            }

        return self._answer(requests, jobs, scores)

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
        at = {p: j for j, p in enumerate(prompts)}

        def scores(requests: list[ScoreRequest], replies: dict[int, Any]) -> dict[int, Score]:
            out = {}
            for i, r in enumerate(requests):
                reply = replies.get(at[r.prefix + r.prompt])
                if reply is not None:
                    out[i] = Score(
                        (choice_logprob(top_alternatives(reply), r.continuation),),
                        prompt_tokens=int(getattr(reply.usage, "prompt_tokens", 0) or 0),
                    )
            return out

        return self._answer(requests, jobs, scores)

    def _answer(
        self,
        requests: list[Any],
        jobs: list[dict[str, Any]],
        results: Callable[[list[Any], dict[int, Any]], dict[int, Any]],
    ) -> list[Any]:
        """Run `jobs` and turn the replies (by job index) into one result per request; on
        a failure part way, the requests whose replies all arrived go with the failure."""
        try:
            replies = self.run_batch(jobs)
        except PartialBatch as failure:
            raise PartialBatch(failure, results(requests, failure.answers)) from failure
        answered = results(requests, dict(enumerate(replies)))
        return [answered[i] for i in range(len(requests))]

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


def _generations(requests: list[GenerateRequest], replies: dict[int, Any]) -> dict[int, Generation]:
    """Request index -> its Generation, for each request whose n samples (jobs in
    order, n per request) all arrived."""
    out: dict[int, Generation] = {}
    first = 0
    for i, r in enumerate(requests):
        mine = [replies.get(first + k) for k in range(r.n)]
        first += r.n
        if all(m is not None for m in mine):
            out[i] = Generation(
                texts=tuple(m.choices[0].text or "" for m in mine),
                prompt_tokens=int(getattr(mine[0].usage, "prompt_tokens", 0) or 0),
                completion_tokens=sum(int(getattr(m.usage, "completion_tokens", 0) or 0) for m in mine),
            )
    return out


# --------------------------------------------------------------------------- probing and compile hooks


def prober(model: str, api_base: str, api_key_env: str | None, deadline: float) -> LiteLLMBackend:
    """The sender `probe` uses for one endpoint: one retry, nothing past `deadline`."""
    # Declared capabilities keep the probe's own backend from probing itself.
    spec = LiteLLMBackendSpec(
        model=model, api_base=api_base, api_key_env=api_key_env, timeout=max(deadline - time.monotonic(), 0.01),
        max_retries=1, backoff=0.2, max_errors=4, capabilities=[Capability.GENERATE.value],
    )
    return LiteLLMBackend(spec, deadline=deadline)


def probe_backend(spec: LiteLLMBackendSpec) -> frozenset[Capability]:
    """What the endpoints of `spec` support, every request within the spec's `timeout` together."""
    import_litellm()  # seconds on a loaded machine, and not time spent waiting for the endpoint
    return probe.probe_endpoints(spec, prober, deadline=time.monotonic() + spec.timeout)


def probe_endpoint(model: str, api_base: str, api_key_env: str | None, *, timeout: float = 30.0) -> probe.Probe:
    """Probe one endpoint (or read its result from disk) within `timeout` seconds."""
    import_litellm()
    return probe.check_endpoint(model, api_base, api_key_env, prober, deadline=time.monotonic() + timeout)


def probing_resolver(timeout: float) -> Callable[[str, Any], frozenset[Capability]]:
    """The compiler's resolver for `dlngraph compile --probe`: declared lists win,
    litellm endpoints are probed, all within one `timeout` (seconds) for the whole
    spec; everything else is the kind's declaration. An endpoint that does not
    answer in time keeps the declaration, with a warning."""
    from dlngraph.compiler.capabilities import declared_capabilities

    deadlines: list[float] = []  # set at the first probe, after litellm is imported

    def resolve(backend_name: str, backend_spec: Any) -> frozenset[Capability]:
        if not isinstance(backend_spec, LiteLLMBackendSpec) or backend_spec.capabilities is not None:
            return declared_capabilities(backend_name, backend_spec)
        if not deadlines:
            import_litellm()
            deadlines.append(time.monotonic() + timeout)
        try:
            return probe.probe_endpoints(backend_spec, prober, deadline=deadlines[0])
        except RuntimeFailure as exc:
            log.warning("backend %s: could not probe its endpoint (%s); using declared capabilities", backend_name,
                        str(exc).splitlines()[0])
            return DECLARED["litellm"]

    return resolve


def token_counter(backend_name: str, backend_spec: Any) -> Callable[[str], int] | None:
    """The compiler's token counter: a litellm backend that names its `tokenizer`
    counts with it, read from local files (so multi-token choices fail at compile
    time); else None."""
    if not isinstance(backend_spec, LiteLLMBackendSpec) or backend_spec.tokenizer is None:
        return None
    tokenizer = load_tokenizer(backend_spec.tokenizer)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
