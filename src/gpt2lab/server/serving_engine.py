"""What the serving classes share (vLLM's ``OpenAIServing``): the model, admission, and a request's lifetime.

A serving class holds the logic of endpoints and never sees HTTP: a method takes the parsed request
(:mod:`.protocol`) and returns the response object, an async iterator of server-sent events
(``stream=true``), or the :class:`~.protocol.APIError` that answers a client's mistake
(:func:`~.protocol.returns_errors`). So it runs, and is tested, without a server; :mod:`.app` only routes.

A request first finds what it runs on (:meth:`OpenAIServing.target_for`: the model or LoRA adapter its
``model`` field names, :class:`~.serving_models.Target`). Admission (:meth:`OpenAIServing.start`): the
engine's own checks run off the event loop, capacity is reserved on that model's engine (429 when full)
and every prompt goes to its :class:`~.scheduler.Scheduler` as one engine request.
:meth:`OpenAIServing.respond` then drives them step by step into a
:class:`~.response_builder.ResponseBuilder`, ending on timeout (408), a failed step (500; 400 when the
request's own settings left nothing to sample) or a client that left.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..sampling import SamplingParams
from ..sampling.constraint import GRAMMAR_ERROR
from ..sampling.pipeline import ALL_MASKED_ERROR
from . import limits as lim
from . import protocol as p
from .metrics import ModelMetrics
from .response_builder import SSE_DONE, ResponseBuilder, sse_event
from .scheduler import EngineFailure, RequestFailed, RequestHandle, iterate
from .serving_models import RETRY_AFTER_S, OpenAIServingModels, Target

Disconnected = Callable[[], Awaitable[bool]]  # async predicate: the client went away (Starlette's is_disconnected)


class OpenAIServing:
    """The base of the serving classes. ``models``: the served models (each with its engine thread);
    ``limits``: the per-request bounds; ``request_timeout``: seconds a request may run.

    A generating method (``create_completion(request, disconnected)``, ...) returns the response object,
    or with ``stream`` an async iterator of server-sent events, or the :class:`~.protocol.APIError` that
    answers the request: 400 naming the field, 404 for a ``model`` not served, 429 when full, 503 while
    loading, 408 past the request
    timeout, 500 when a step fails (400 ``nothing_to_sample`` when the request's own settings banned every
    token). ``disconnected`` (an async predicate, None: never asked) is polled while generating; when it
    says the client left, the request is aborted."""

    endpoint = ""  # this endpoint's label in the latency metrics

    def __init__(self, models: OpenAIServingModels, *, limits: lim.Limits, request_timeout: float) -> None:
        self.models, self.limits = models, limits
        self.request_timeout = request_timeout

    def target_for(self, request: Any) -> Target:
        """The model or adapter ``request.model`` (None: not sent, the first model) names, loaded: 503 while it
        loads, 404 ``model_not_found`` for a name this server does not serve."""
        return self.models.target(request.model)

    def check_capacity(self, target: Target, num_prompts: int, params: SamplingParams, field: str = "n") -> None:
        """400 naming ``field`` (``n``, or ``best_of`` when it set ``params.n``) if ``num_prompts x n`` sequences
        exceed what the target's engine can ever hold."""
        sequences, capacity = num_prompts * params.n, target.scheduler.capacity
        if sequences > capacity:
            # the field to change: n (or best_of) when one prompt's samples alone do not fit, else the prompts
            param = field if params.n > capacity else "prompt"
            raise p.invalid(f"this request needs {sequences} sequences ({num_prompts} prompts x {field} "
                            f"{params.n}) but the server holds at most {capacity} (max_batch + max_queue)", param)

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` within this server's limits (:func:`~.limits.check_params`: 400 naming the field)."""
        lim.check_params(params, self.limits)
        return params

    async def start(self, target: Target, prompts: list[list[int]], params: SamplingParams,
                    request_id: str) -> RequestHandle:
        """Check the request against the target's model (off the loop), reserve capacity and queue every prompt
        as one engine request (``{request_id}-{i}``, with the target's adapter); 400 naming the field the engine
        refuses, 429 when full."""
        scheduler = target.scheduler
        sequences = len(prompts) * params.n
        self.check_capacity(target, len(prompts), params)

        def admissible() -> None:  # the engine's own admission checks, before any capacity is taken
            for ids in prompts:
                scheduler.engine.check_request(ids, params, adapter=target.adapter)

        try:
            await run_in_threadpool(admissible)
        except ValueError as exc:
            raise p.params_error(exc) from None
        if not scheduler.reserve(sequences):
            scheduler.metrics.rejected.inc()
            raise p.APIError(429, "the server is at capacity (running batch and queue are full); retry "
                             f"after {RETRY_AFTER_S} s", type="rate_limit_error", code="queue_full",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await scheduler.submit([(ids, params, f"{request_id}-{i}") for i, ids in enumerate(prompts)],
                                          adapter=target.adapter)
        except ValueError as exc:  # the engine's own checks (should not happen after ours)
            raise p.params_error(exc) from None

    async def respond(self, target: Target, handle: RequestHandle, arrival: float, builder: ResponseBuilder,
                      stream: bool | None, stream_options: p.StreamOptions | None,
                      disconnected: Disconnected | None, structured_field: str | None = None) -> Any:
        """Run the admitted request (``arrival``: its ``time.monotonic()``) on ``target``: the whole response
        object, or (``stream``) an async iterator of server-sent events ending in ``data: [DONE]``. A timeout or
        failed step raises its :class:`~.protocol.APIError`, or ends the stream with an error event
        (``structured_field``: the request field its structured output came from, named by a grammar error)."""
        ctx = RequestContext(target.scheduler.metrics, handle, arrival, self.request_timeout, self.endpoint,
                             structured_field)
        if stream:
            include_usage = bool(stream_options and stream_options.include_usage)
            # vLLM's continuous_usage_stats: every chunk carries the usage so far (with include_usage)
            continuous = include_usage and bool(stream_options and stream_options.continuous_usage_stats)

            async def events() -> AsyncIterator[str]:
                try:
                    failed = False
                    async for item in ctx.run(disconnected):
                        if isinstance(item, p.APIError):  # timeout or engine failure: an error event ends it
                            yield sse_event(item.body())
                            failed = True
                            break
                        for chunk in builder.first_chunks() if item is None else builder.chunks(item):
                            if continuous:
                                chunk["usage"] = builder.usage().model_dump()
                            yield sse_event(chunk)
                    if include_usage and not failed:
                        yield sse_event(builder.usage_chunk())
                    yield SSE_DONE
                finally:
                    ctx.close()

            return events()
        try:
            async for item in ctx.run(disconnected):
                if isinstance(item, p.APIError):
                    raise item
                if item is not None:
                    builder.add(item)
        finally:
            ctx.close()
        return builder.response()


class RequestContext:
    """Drives one admitted request: yields ``None`` once (start), then each step's outputs; ends with
    an :class:`~.protocol.APIError` item on timeout or engine failure. Aborts what is left and records
    metrics (time to first token, latency, aborts by reason)."""

    def __init__(self, metrics: ModelMetrics, handle: RequestHandle, arrival: float, timeout: float,
                 endpoint: str, structured_field: str | None = None) -> None:
        self.metrics, self.handle = metrics, handle
        self.arrival, self.timeout, self.endpoint = arrival, timeout, endpoint
        self.structured_field = structured_field

    async def run(self, disconnected: Disconnected | None) -> AsyncIterator[Any]:
        """The request's items; ``disconnected`` (None: never asked) ends it early, as an abort."""
        first = True
        reason = "disconnect"  # what an early exit means unless set otherwise
        try:
            yield None
            async for outs in iterate(self.handle, self.arrival + self.timeout, disconnected):
                if first:
                    self.metrics.ttft(self.endpoint).observe(time.monotonic() - self.arrival)
                    first = False
                yield outs
            reason = ""
            self.metrics.latency(self.endpoint).observe(time.monotonic() - self.arrival)
        except TimeoutError:
            reason = "timeout"
            # 408, not 504: the server stopped the request on purpose, it is not a failing upstream
            yield p.APIError(408, f"the request ran longer than the server's request timeout "
                             f"({self.timeout:g} s) and was stopped", type="timeout_error", code="request_timeout")
        except ConnectionAbortedError:
            pass
        except (EngineFailure, RequestFailed) as exc:
            reason = "error"
            message = str(exc) if isinstance(exc, EngineFailure) else f"generation failed for this request: {exc}"
            if isinstance(exc, RequestFailed) and ALL_MASKED_ERROR in str(exc):
                # the request's own settings banned every token (stop_token_ids with min_tokens, bad_words,
                # logit_bias...): the client's to change, not a server fault (it was a 500)
                yield p.APIError(400, message, type="invalid_request_error", code="nothing_to_sample")
            elif isinstance(exc, RequestFailed) and GRAMMAR_ERROR in str(exc):
                # the request's structured output hit a limit of the grammar engine while generating
                yield p.APIError(400, message, type="invalid_request_error", code="structured_output_failed",
                                 param=self.structured_field)
            else:
                yield p.APIError(500, message, type="server_error", code="generation_failed")
        finally:
            if reason:
                self.metrics.aborted(reason).inc()
            self.close()

    def close(self) -> None:
        """Abort what is left (the engine thread then gives the capacity back)."""
        self.handle.abort()


# -- checks shared by the endpoints -------------------------------------------------------------------
def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """400 naming ``param`` if an id of ``ids`` is outside the vocabulary ``[0, vocab_size)``."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise p.invalid(f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size - 1}]", param)


def check_context_length(prompt_len: int, max_tokens: int, n_positions: int) -> None:
    """400 ``context_length_exceeded`` if a prompt of ``prompt_len`` tokens plus ``max_tokens`` new ones
    do not fit the context of ``n_positions`` tokens (naming ``prompt`` if the prompt alone does not)."""
    if prompt_len + max_tokens > n_positions:
        param = "prompt" if prompt_len > n_positions else "max_tokens"
        raise p.invalid(f"this model's maximum context length is {n_positions} tokens, but {prompt_len + max_tokens}"
                        f" were requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
                        "shorten the prompt or lower max_tokens", param, "context_length_exceeded")


# what a checkpoint's generation_config.json cannot set for a request: the response's shape (n, beams) and
# transformers' prompt-inclusive max_length (the API counts new tokens only)
_NOT_FROM_CHECKPOINT = frozenset({"n", "num_beams", "max_length"})


def sampling_defaults(gen: Any, max_tokens: int) -> Callable[[dict[str, Any]], SamplingParams]:
    """Request fields -> SamplingParams: fields the client did not send take the checkpoint's
    generation_config.json, then the endpoint's default length (``max_tokens``), then SamplingParams'."""
    return lambda given: gen.resolve_sampling(given, {"max_new_tokens": max_tokens}, skip=_NOT_FROM_CHECKPOINT)
