"""The FastAPI application: OpenAI-compatible completions and chat, tokenizer routes, health, metrics, playground.

``create_app(model_or_generator)`` returns the app; the model loads on the engine thread when the app
starts (``/health`` answers 503 until then). Handlers validate, reserve capacity (429 when full),
hand token ids to the :class:`~gpt2lab.server.scheduler.Scheduler` and turn its per-step outputs into
OpenAI response bodies or server-sent events.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.engine import truncate_prompt_tokens
from ..sampling import SamplingParams
from ..sampling.pipeline import ALL_MASKED_ERROR
from . import limits as lim
from . import protocol as p
from .http import LimitBody
from .metrics import ServerMetrics
from .scheduler import EngineFailure, RequestFailed, RequestHandle, Scheduler, iterate

log = logging.getLogger("gpt2lab.server")

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
DEFAULT_CHAT_MAX_TOKENS = 256  # chat replies: capped so a GPT-2 that never stops does not fill the context
RETRY_AFTER_S = 1
_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
           "/detokenize", "/openapi.json", "/docs")


class _CountRequests:
    """Pure ASGI middleware counting answers by route and status (it leaves ``receive`` alone, so
    handlers still see client disconnects, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


def create_app(generator_or_model_ref: Any = None, *, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, request_timeout: float = 600.0, model_name: str | None = None,
               device: str = "auto", dtype: str | None = None, quantization: str | None = None,
               cors_allow_origins: Sequence[str] = (), max_body_mb: float = lim.MAX_BODY_MB,
               limits: lim.Limits | None = None) -> FastAPI:
    """The server app.

    ``generator_or_model_ref``: a loaded :class:`~gpt2lab.generation.Generator`, or anything
    :func:`gpt2lab.load` accepts (a directory, a bundled name, a Hub id, ``None`` for the default),
    loaded on the engine thread at startup (it decodes through gpt2lab's kernels without further setup).
    ``api_key``: required as ``Authorization: Bearer KEY`` on every ``/v1`` route and the tokenizer
    routes. ``max_batch`` sequences decode together, up to
    ``max_queue`` more wait; beyond that requests get 429. ``request_timeout`` (seconds) ends a
    request that runs longer. ``device``, ``dtype``, ``quantization``: how a model loaded here runs (as in
    :func:`gpt2lab.load`; ``quantization`` is passed only when given). ``cors_allow_origins``: origins
    (``https://host:port``, or ``*``) whose browser pages may call the API (CORS, off when empty).
    ``max_body_mb``: larger request bodies get 413; ``limits``: the other per-request bounds
    (:class:`~gpt2lab.server.limits.Limits`).

    Every client-controlled size is bounded, and tokenizing runs on worker threads, never on the
    event loop: ``/health`` and running streams go on while a big prompt is checked.
    """
    for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")
    if not (isinstance(max_body_mb, (int, float)) and 0 < max_body_mb <= 1024):
        raise ValueError(f"max_body_mb must be in (0, 1024] megabytes, got {max_body_mb!r}")
    from dataclasses import replace

    limits = replace(limits or lim.Limits(), max_body_bytes=int(max_body_mb * 2**20))
    prompt_chars: dict[str, int] = {}  # "max": the longest prompt text that can fit (set when the model loads)

    def load() -> Any:
        from ..generation import Generator
        from ..generation import load as load_generator

        if isinstance(generator_or_model_ref, Generator):
            gen = generator_or_model_ref  # the caller's model: left as it is (it may still train)
        else:
            more = {} if quantization is None else {"quantization": quantization}
            gen = load_generator(generator_or_model_ref, device=device, dtype=dtype, **more)
        prompt_chars["max"] = lim.max_prompt_chars(gen.tokenizer, gen.config.n_positions)
        return gen

    metrics = ServerMetrics()
    scheduler = Scheduler(load, max_batch=max_batch, max_queue=max_queue, metrics=metrics,
                          model_is_callers=not isinstance(generator_or_model_ref, (str, Path, type(None))))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="gpt2lab", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible GPT-2 server with continuous batching.")
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(LimitBody, limits=limits)
    app.add_middleware(_CountRequests, metrics=metrics)  # outside LimitBody: 413s are counted too
    if cors_allow_origins:  # added last: outermost, so preflights are answered before auth and routing
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    _install_error_handlers(app)

    # -- dependencies ---------------------------------------------------------------------------
    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest on bytes: constant time whatever the token is (ASCII-only str would raise)
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise p.APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")

    def ready() -> Any:
        if not scheduler.ready.is_set():
            raise p.APIError(503, "the model is still loading; retry shortly", type="server_error",
                             code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        if scheduler.load_error is not None:
            raise p.APIError(503, f"the model failed to load: {scheduler.load_error}", type="server_error",
                             code="model_load_failed")
        return scheduler.generator

    def served_name(gen: Any) -> str:
        return model_name or gen.name

    def check_model(gen: Any, model: str | None) -> None:
        names = {served_name(gen), gen.name, str(gen.path) if gen.path else None}
        if model is not None and model not in names:
            raise p.invalid(f"model {model!r} is not served here; this server serves {served_name(gen)!r} "
                            "(see /v1/models)", "model", "model_not_found")

    auth = [Depends(require_key)]
    errors: dict[int | str, dict[str, Any]] = {400: {"model": p.ErrorResponse}, 429: {"model": p.ErrorResponse}}

    # -- plain routes ---------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(_playground_html())

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded and the engine runs; 503 while loading or if loading failed."""
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        if scheduler.load_error is not None:
            return JSONResponse({"status": "error", "error": str(scheduler.load_error)}, status_code=503)
        # a failed step (out of memory, a broken model) ended every request in flight: still serving,
        # but "degraded" until a step succeeds again
        body = {"status": "degraded" if scheduler.last_engine_error else "ok",
                "model": served_name(scheduler.generator), "engine_failures": scheduler.engine_failures,
                "request_failures": scheduler.request_failures}
        if scheduler.last_engine_error:
            body["last_engine_error"] = scheduler.last_engine_error
        return JSONResponse(body)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card(gen: Any) -> p.ModelCard:
        return p.ModelCard(id=served_name(gen), created=created, max_model_len=gen.config.n_positions,
                           generation_config=gen.generation_config,
                           quantization=getattr(gen, "quantization", None))

    @app.get("/v1/models", dependencies=auth, response_model=p.ModelList)
    async def list_models() -> p.ModelList:
        return p.ModelList(data=[model_card(ready())])

    @app.get("/v1/models/{model_id:path}", dependencies=auth, response_model=p.ModelCard,
             responses={404: {"model": p.ErrorResponse}})
    async def retrieve_model(model_id: str) -> p.ModelCard:
        """One model by id (OpenAI's ``models.retrieve``); 404 for any other id."""
        gen = ready()
        if model_id != served_name(gen):
            raise p.APIError(404, f"The model {model_id!r} does not exist; this server serves "
                             f"{served_name(gen)!r}", param="model", code="model_not_found")
        return model_card(gen)

    @app.post("/tokenize", dependencies=auth, response_model=p.TokenizeResponse, responses=errors)
    async def tokenize(body: p.TokenizeRequest) -> p.TokenizeResponse:
        gen = ready()
        check_model(gen, body.model)
        lim.check_text(body.prompt, limits.max_tokenize_chars, "prompt")
        ids = await run_in_threadpool(gen.tokenizer.encode, body.prompt)
        return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=gen.config.n_positions)

    @app.post("/detokenize", dependencies=auth, response_model=p.DetokenizeResponse, responses=errors)
    async def detokenize(body: p.DetokenizeRequest) -> p.DetokenizeResponse:
        gen = ready()
        check_model(gen, body.model)
        if len(body.tokens) > limits.max_detokenize_tokens:
            raise p.invalid(f"tokens: at most {limits.max_detokenize_tokens} token ids per request (this server's "
                            f"limit), got {len(body.tokens)}", "tokens", "limit_exceeded")

        def decode() -> str:
            _check_token_ids(body.tokens, gen.config.vocab_size, "tokens")
            return gen.tokenizer.decode(body.tokens)

        return p.DetokenizeResponse(prompt=await run_in_threadpool(decode))

    # -- generation -----------------------------------------------------------------------------
    def check_capacity(num_prompts: int, params: SamplingParams) -> None:
        sequences = num_prompts * params.n
        if sequences > scheduler.capacity:
            raise p.invalid(f"this request needs {sequences} sequences (prompts x n) but the server holds at "
                            f"most {scheduler.capacity} (max_batch + max_queue)", "n")

    def check_params(params: SamplingParams) -> SamplingParams:
        lim.check_params(params, limits)
        return params

    async def start(gen: Any, prompts: list[list[int]], params: SamplingParams, prefix: str) -> RequestHandle:
        """Check the request against the model (off the loop), reserve capacity and queue every prompt as
        one engine request; 400 naming the field the engine refuses, 429 when full."""
        sequences = len(prompts) * params.n
        check_capacity(len(prompts), params)

        def admissible() -> None:  # the engine's own admission checks, before any capacity is taken
            for ids in prompts:
                scheduler.engine.check_request(ids, params)

        try:
            await run_in_threadpool(admissible)
        except ValueError as exc:
            raise p.params_error(exc) from None
        if not scheduler.reserve(sequences):
            metrics.rejected.inc()
            raise p.APIError(429, "the server is at capacity (running batch and queue are full); retry "
                             f"after {RETRY_AFTER_S} s", type="rate_limit_error", code="queue_full",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await scheduler.submit([(ids, params, f"{prefix}-{i}") for i, ids in enumerate(prompts)])
        except ValueError as exc:  # the engine's own checks (should not happen after ours)
            raise p.params_error(exc) from None

    @app.post("/v1/completions", dependencies=auth, response_model=p.CompletionResponse, responses=errors)
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        """OpenAI completions: prompt(s) in, n completions each; ``stream`` for server-sent events."""
        arrival = time.monotonic()
        gen = ready()
        check_model(gen, body.model)
        body.check_common()
        if body.suffix is not None:
            raise p.invalid("suffix is not supported: GPT-2 only continues text", "suffix")
        params = check_params(body.sampling_params(body.max_tokens, body.logprobs,
                                                   resolve=_defaults(gen, DEFAULT_MAX_TOKENS)))
        max_tokens = params.max_new_tokens
        if body.best_of is not None and body.best_of != params.n:
            raise p.invalid(f"best_of must equal n ({params.n}) when given; ranking candidates is not "
                            "supported", "best_of")
        _check_token_ids(params.stop_token_ids, gen.config.vocab_size, "stop_token_ids")
        check_capacity(_count_prompts(body.prompt), params)  # before tokenizing any of them
        # a prompt cut to its last k tokens may be longer than the context: then only the body limit bounds it
        max_chars = prompt_chars["max"] if params.truncate_prompt_tokens is None else None
        prompts, texts = await run_in_threadpool(_encode_prompts, gen, body.prompt, max_chars)
        if params.truncate_prompt_tokens is not None:  # vLLM: the prompt is its last k tokens, echo included
            cut = [truncate_prompt_tokens(ids, params, gen.config.n_positions) for ids in prompts]
            texts = [t if len(c) == len(ids) else gen.tokenizer.decode(c) for t, c, ids in zip(texts, cut, prompts)]
            prompts = cut
        for ids in prompts:
            _check_context(len(ids), max_tokens, gen.config.n_positions)
        echo = bool(body.echo)
        rid = p.new_id("cmpl")
        name = served_name(gen)
        handle = await start(gen, prompts, params, rid)
        ctx = _RequestContext(metrics, handle, arrival, request_timeout, "/v1/completions")
        prompt_lp = None
        if echo and body.logprobs is not None:  # prompt logprobs: scored on the model thread between steps
            top = body.logprobs
            try:
                prompt_lp = [await scheduler.call(lambda g, ids=ids: g.score(ids, top_n=top)) for ids in prompts]
            except BaseException:
                ctx.close()
                raise
        builder = _CompletionBuilder(gen, rid, name, params.n, texts if echo else None, prompt_lp, prompts)
        return await _respond(ctx, request, builder, body.stream, body.stream_options)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=p.ChatCompletionResponse,
              responses=errors)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        """OpenAI chat completions: messages rendered by the model's chat template (as ``gpt2lab chat``)."""
        arrival = time.monotonic()
        gen = ready()
        check_model(gen, body.model)
        body.check_common()
        body.check_openai_fields()
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise p.invalid("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise p.invalid("top_logprobs needs logprobs=true", "top_logprobs")
        n_pos = gen.config.n_positions
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and isinstance(max_tokens, int) and max_tokens >= n_pos:
            raise p.invalid(f"{param_name} ({max_tokens}) leaves no room for the conversation in the model's "
                            f"context of {n_pos} tokens", param_name, "context_length_exceeded")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = check_params(body.sampling_params(max_tokens, logprobs, param_name,
                                                   resolve=_defaults(gen, DEFAULT_CHAT_MAX_TOKENS)))
        _check_token_ids(params.stop_token_ids, gen.config.vocab_size, "stop_token_ids")
        _check_messages(body.messages, limits, prompt_chars["max"], n_pos)
        chat, style = await run_in_threadpool(_render_chat, gen, body.messages,
                                              n_pos - (max_tokens if max_tokens is not None else 1))
        prompt_ids = truncate_prompt_tokens(chat.token_ids, params, n_pos)
        if max_tokens is None:  # default: as much as fits, at most the checkpoint's or DEFAULT_CHAT_MAX_TOKENS
            params = params.with_(max_new_tokens=max(params.min_tokens,
                                                     min(params.max_new_tokens, n_pos - len(prompt_ids))))
        params = params.with_(stop=[*params.stop, *chat.stop])
        rid = p.new_id("chatcmpl")
        name = served_name(gen)
        handle = await start(gen, [prompt_ids], params, rid)
        ctx = _RequestContext(metrics, handle, arrival, request_timeout, "/v1/chat/completions")
        builder = _ChatBuilder(gen, rid, name, params.n, len(prompt_ids), style, logprobs)
        return await _respond(ctx, request, builder, body.stream, body.stream_options)

    return app


# -- request lifetime ----------------------------------------------------------------------------
class _RequestContext:
    """Drives one admitted request: yields ``None`` once (start), then each step's outputs; ends with
    an :class:`APIError` item on timeout or engine failure. Aborts what is left and records metrics."""

    def __init__(self, metrics: ServerMetrics, handle: RequestHandle, arrival: float, timeout: float,
                 endpoint: str) -> None:
        self.metrics, self.handle = metrics, handle
        self.arrival, self.timeout, self.endpoint = arrival, timeout, endpoint

    async def run(self, request: Request) -> AsyncIterator[Any]:
        first = True
        reason = "disconnect"  # what an early exit means unless set otherwise
        try:
            yield None
            async for outs in iterate(self.handle, self.arrival + self.timeout, request.is_disconnected):
                if first:
                    self.metrics.ttft.labels(self.endpoint).observe(time.monotonic() - self.arrival)
                    first = False
                yield outs
            reason = ""
            self.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.arrival)
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
            else:
                yield p.APIError(500, message, type="server_error", code="generation_failed")
        finally:
            if reason:
                self.metrics.aborted.labels(reason).inc()
            self.close()

    def close(self) -> None:
        """Abort what is left (the engine thread then gives the capacity back)."""
        self.handle.abort()


async def _respond(ctx: _RequestContext, request: Request, builder: Any, stream: bool | None,
                   stream_options: p.StreamOptions | None) -> Any:
    """Run the request: the whole response body, or server-sent events ending in ``data: [DONE]``."""
    if stream:
        include_usage = bool(stream_options and stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            try:
                failed = False
                async for item in ctx.run(request):
                    if isinstance(item, p.APIError):  # timeout or engine failure: an error event ends it
                        yield _sse(item.body())
                        failed = True
                        break
                    for chunk in builder.first_chunks() if item is None else builder.chunks(item):
                        yield _sse(chunk)
                if include_usage and not failed:
                    yield _sse(builder.usage_chunk())
                yield "data: [DONE]\n\n"
            finally:
                ctx.close()

        return _stream(events())
    try:
        async for item in ctx.run(request):
            if isinstance(item, p.APIError):
                raise item
            if item is not None:
                builder.add(item)
    finally:
        ctx.close()
    return builder.response()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- validation helpers --------------------------------------------------------------------------
def _check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise p.invalid(f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size - 1}]", param)


# what a checkpoint's generation_config.json cannot set for a request: the response's shape (n, beams) and
# transformers' prompt-inclusive max_length (the API counts new tokens only)
_NOT_FROM_CHECKPOINT = frozenset({"n", "num_beams", "max_length"})


def _defaults(gen: Any, max_tokens: int) -> Callable[[dict[str, Any]], SamplingParams]:
    """Request fields -> SamplingParams: fields the client did not send take the checkpoint's
    generation_config.json, then the endpoint's default length (``max_tokens``), then SamplingParams'."""
    return lambda given: gen.resolve_sampling(given, {"max_new_tokens": max_tokens}, skip=_NOT_FROM_CHECKPOINT)


def _check_context(prompt_len: int, max_tokens: int, n_positions: int) -> None:
    if prompt_len + max_tokens > n_positions:
        param = "prompt" if prompt_len > n_positions else "max_tokens"
        raise p.invalid(f"this model's maximum context length is {n_positions} tokens, but {prompt_len + max_tokens}"
                        f" were requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
                        "shorten the prompt or lower max_tokens", param, "context_length_exceeded")


def _count_prompts(prompt: str | list) -> int:
    return 1 if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else len(prompt)


def _check_messages(messages: list[p.ChatMessage], limits: lim.Limits, max_chars: int, n_positions: int) -> None:
    """Bounds on a conversation, checked before it is rendered and tokenized."""
    if len(messages) > limits.max_messages:
        raise p.invalid(f"messages: at most {limits.max_messages} messages per request (this server's limit), "
                        f"got {len(messages)}", "messages", "limit_exceeded")
    total = 0
    for i, message in enumerate(messages):
        text = message.text()
        lim.check_text(text, max_chars, f"messages[{i}].content", n_positions)
        total += len(text)
    if total > limits.chat_context_factor * max_chars:
        raise p.invalid(f"messages hold {total} characters in all, more than this server's limit of "
                        f"{limits.chat_context_factor * max_chars} ({limits.chat_context_factor} contexts' worth)",
                        "messages", "limit_exceeded")


def _encode_prompts(gen: Any, prompt: str | list, max_chars: int | None) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (a string, strings, token ids, or lists of token ids); a text
    longer than ``max_chars`` is refused before it is tokenized. Runs on a worker thread."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise p.invalid("prompt is an empty list", "prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            if max_chars is not None:
                lim.check_text(item, max_chars, "prompt", gen.config.n_positions)
            ids.append(gen.encode_prompt(item))  # "" starts from <|endoftext|>, as GPT-2 was trained
            texts.append(item)
        else:
            if not item:
                raise p.invalid("prompt holds an empty list of token ids", "prompt")
            _check_token_ids(item, gen.config.vocab_size, "prompt")
            ids.append(list(item))
            texts.append(gen.tokenizer.decode(item))
    return ids, texts


_LAYOUT_ROLE = {"developer": "system", "tool": "user"}


def _render_chat(gen: Any, messages: list[p.ChatMessage], max_prompt_tokens: int) -> tuple[Any, Any]:
    """The conversation as a prompt rendered by the model's chat template, as ``gpt2lab chat`` renders it
    (oldest turns dropped to fit ``max_prompt_tokens``, system messages kept), and that layout's style."""
    from ..generation import chat_format

    try:
        # developer = system (OpenAI's newer name); a tool result is a line on the user's side
        plain = [{"role": _LAYOUT_ROLE.get(m.role, m.role),
                  "content": f"Tool result: {m.text()}" if m.role == "tool" else m.text()} for m in messages]
        chat_format.from_messages(plain)  # checks roles and contents
        if all(m["role"] == "system" for m in plain):
            raise p.invalid("messages needs at least one user or assistant message", "messages")
        style = chat_format.style_for_model(gen.name, gen.path)
        return chat_format.build_prompt_messages(plain, gen.tokenizer, style, max_prompt_tokens), style
    except ValueError as exc:
        raise p.invalid(str(exc), "messages", "context_length_exceeded" if "fit" in str(exc) else None) from None


# -- response assembly ---------------------------------------------------------------------------
class _Builder:
    """Accumulates engine outputs into choices (index = prompt * n + sample), for a whole response
    (``add`` then ``response``) or as stream chunks (``first_chunks``, ``chunks``, ``usage_chunk``)."""

    chunk_object = ""

    def __init__(self, gen: Any, rid: str, name: str, count: int, prompt_tokens: int) -> None:
        self.tok, self.rid, self.name, self.prompt_tokens = gen.tokenizer, rid, name, prompt_tokens
        self.text = [""] * count
        self.reason: list[str | None] = [None] * count
        self.generated = [0] * count
        self.prompt_logprobs: list[p.PromptLogprobs | None] = [None] * count  # vLLM's prompt_logprobs

    def _index(self, out: Any) -> int:
        return out.index

    def usage(self) -> p.Usage:
        done = sum(self.generated)
        return p.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)

    def _keep_prompt_logprobs(self, i: int, out: Any) -> None:
        """vLLM's layout: one entry per prompt token (the first is null), each keyed by token id and
        holding the prompt's own token (with its rank) and the top alternatives."""
        if out.prompt_logprobs is None:
            return
        entries: p.PromptLogprobs = [None]
        for e in out.prompt_logprobs:
            entry = {str(e.token_id): p.PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=e.token)}
            for rank, (tid, token, value) in enumerate(e.top, 1):
                entry.setdefault(str(tid), p.PromptLogprob(logprob=value, rank=rank, decoded_token=token))
            entries.append(entry)
        self.prompt_logprobs[i] = entries

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.rid, "object": self.chunk_object, "created": int(time.time()), "model": self.name,
                "choices": [], "usage": self.usage().model_dump()}


class _CompletionBuilder(_Builder):
    chunk_object = "text_completion"

    def __init__(self, gen: Any, rid: str, name: str, n: int, echo_texts: list[str] | None,
                 prompt_lp: list[list] | None, prompts: list[list[int]]) -> None:
        super().__init__(gen, rid, name, len(prompts) * n, sum(map(len, prompts)))
        self.n, self.echo_texts = n, echo_texts
        self.logprobs: list[p.CompletionLogprobs | None] = [None] * len(self.text)
        self.offset = [0] * len(self.text)  # text_offset of the next token, per choice
        for i in range(len(self.text) if echo_texts is not None else 0):
            self.text[i] = echo_texts[i // n]
            self.offset[i] = len(self.text[i])
            if prompt_lp is not None:
                self.logprobs[i] = self._prompt_logprobs(prompts[i // n], prompt_lp[i // n])

    def _index(self, out: Any) -> int:
        return int(out.request_id.rsplit("-", 1)[1]) * self.n + out.index

    def _prompt_logprobs(self, ids: list[int], scored: list[Any]) -> p.CompletionLogprobs:
        first = self.tok.id_to_token(ids[0])  # the first token has no logprob (nothing before it)
        lp = p.CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
        self._extend(lp, scored, len(first))
        return lp

    @staticmethod
    def _extend(lp: p.CompletionLogprobs, entries: list[Any], offset: int) -> int:
        for entry in entries:
            lp.tokens.append(entry.token)
            lp.token_logprobs.append(entry.logprob)
            top = {t: v for _, t, v in entry.top}
            top.setdefault(entry.token, entry.logprob)  # the chosen token always (up to k + 1 entries, as OpenAI)
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(entry.token)
        return offset

    def _step(self, out: Any) -> tuple[int, p.CompletionLogprobs | None]:
        i = self._index(out)
        self.generated[i] += len(out.token_ids)
        self.reason[i] = out.finish_reason
        self._keep_prompt_logprobs(i, out)
        if out.logprobs is None:
            return i, None
        lp = p.CompletionLogprobs()
        self.offset[i] = self._extend(lp, out.logprobs, self.offset[i])
        return i, lp

    def _chunk(self, choice: p.CompletionChoice) -> dict[str, Any]:
        return p.CompletionResponse(id=self.rid, model=self.name, choices=[choice]).model_dump()

    def first_chunks(self) -> list[dict[str, Any]]:
        if self.echo_texts is None:
            return []
        return [self._chunk(p.CompletionChoice(text=t, index=i, logprobs=lp))
                for i, (t, lp) in enumerate(zip(self.text, self.logprobs))]

    def chunks(self, outs: list[Any]) -> list[dict[str, Any]]:
        chunks = []
        for out in outs:
            i, lp = self._step(out)
            if out.text or out.finished or (lp is not None and lp.tokens):
                chunks.append(self._chunk(p.CompletionChoice(text=out.text, index=i, logprobs=lp,
                                                             finish_reason=out.finish_reason)))
        return chunks

    def add(self, outs: list[Any]) -> None:
        for out in outs:
            i, lp = self._step(out)
            self.text[i] += out.text
            if lp is not None:
                acc = self.logprobs[i] = self.logprobs[i] or p.CompletionLogprobs()
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(acc, key).extend(getattr(lp, key))

    def response(self) -> p.CompletionResponse:
        choices = [p.CompletionChoice(text=t, index=i, logprobs=lp, finish_reason=r, prompt_logprobs=plp)
                   for i, (t, lp, r, plp) in enumerate(zip(self.text, self.logprobs, self.reason,
                                                           self.prompt_logprobs))]
        return p.CompletionResponse(id=self.rid, model=self.name, choices=choices, usage=self.usage())


class _ChatBuilder(_Builder):
    """The reply's leading space (after ``Bot:``) is dropped; whole replies go through ``clean_reply``."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, gen: Any, rid: str, name: str, n: int, prompt_tokens: int, style: Any,
                 top_logprobs: int | None = None) -> None:
        super().__init__(gen, rid, name, n, prompt_tokens)
        self.style, self.top_n = style, top_logprobs
        self.logprobs: list[list[p.ChatTokenLogprob] | None] = [None] * n

    def _logprobs(self, out: Any) -> list[p.ChatTokenLogprob] | None:
        if out.logprobs is None:
            return None
        raw = self.tok.token_bytes

        def top(e: Any) -> list[p.TopLogprob]:
            if not self.top_n:
                return []
            alternatives = list(e.top)
            if all(i != e.token_id for i, _, _ in alternatives):  # the chosen token always: up to k + 1
                alternatives.append((e.token_id, e.token, e.logprob))
            return [p.TopLogprob(token=t, logprob=v, bytes=list(raw(i))) for i, t, v in alternatives]

        return [p.ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(raw(e.token_id)), top_logprobs=top(e))
                for e in out.logprobs]

    def _step(self, out: Any) -> str:
        self._keep_prompt_logprobs(0, out)  # the conversation's: the same for every choice
        text = out.text if self.text[out.index] else out.text.lstrip()
        self.text[out.index] += text
        self.generated[out.index] += len(out.token_ids)
        self.reason[out.index] = out.finish_reason
        return text

    def _chunk(self, choice: p.ChatChunkChoice) -> dict[str, Any]:
        chunk = p.ChatCompletionChunk(id=self.rid, model=self.name, choices=[choice]).model_dump()
        chunk["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)  # OpenAI omits unset keys
        return chunk

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk(p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content="")))
                for i in range(len(self.text))]

    def chunks(self, outs: list[Any]) -> list[dict[str, Any]]:
        chunks = []
        for out in outs:
            text, lp = self._step(out), self._logprobs(out)
            if text or out.finished or lp:
                chunks.append(self._chunk(p.ChatChunkChoice(
                    index=out.index, delta=p.ChatDelta(content=text or None), finish_reason=out.finish_reason,
                    logprobs=p.ChatLogprobs(content=lp) if lp is not None else None)))
        return chunks

    def add(self, outs: list[Any]) -> None:
        for out in outs:
            self._step(out)
            lp = self._logprobs(out)
            if lp is not None:
                self.logprobs[out.index] = (self.logprobs[out.index] or []) + lp

    def response(self) -> p.ChatCompletionResponse:
        from ..generation.chat_format import clean_reply

        choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=clean_reply(t, self.style)),
                                logprobs=p.ChatLogprobs(content=lp) if lp is not None else None, finish_reason=r)
                   for i, (t, lp, r) in enumerate(zip(self.text, self.logprobs, self.reason))]
        return p.ChatCompletionResponse(id=self.rid, model=self.name, choices=choices, usage=self.usage(),
                                        prompt_logprobs=self.prompt_logprobs[0])


# -- errors --------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.APIError)
    async def api_error(request: Request, exc: p.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc.errors())
        return JSONResponse(p.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(p.error_body(str(exc.detail), type=kind, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gpt2lab: unhandled error on %s", request.url.path)
        return JSONResponse(p.error_body(f"internal server error: {type(exc).__name__}", type="server_error"),
                            status_code=500)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's error list -> one message naming the field (OpenAI errors carry a single ``param``)."""
    if not errors:
        return "invalid request body", None
    # our validators' own messages (e.g. invalid Unicode) say more than the union's "wrong type" ones
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    loc = [part for part in first.get("loc", ()) if part != "body"]
    # drop the union-member tags pydantic adds ("str", "list[int]", ...): they are not field names
    path = [part for part in loc if not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS))]
    if not path:
        return f"the request body must be a JSON object ({first.get('msg', 'invalid')})", None
    param = str(path[0]) + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in path[1:])
    if first.get("type") == "extra_forbidden":
        return f"unknown parameter {param!r}", param
    if first.get("type") == "value_error":  # our validators' messages, without pydantic's prefix
        return f"{param}: {first.get('msg', '').removeprefix('Value error, ')}", param
    same_field = [e for e in errors if [x for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]
    if len(same_field) > 1 and first.get("type", "").endswith("_type"):
        return f"{param}: wrong type ({first['msg'].lower()} or one of the other accepted forms)", param
    return f"{param}: {first.get('msg', 'invalid value')}", param


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "TextPart"}


def _version() -> str:
    from .. import __version__

    return __version__


def _playground_html() -> str:
    return (Path(str(resources.files("gpt2lab.server") / "static" / "playground.html"))).read_text(encoding="utf-8")

