"""The HTTP layer (FastAPI): ``create_app`` wires the server together and routes each endpoint to its serving object.

``create_app(model_or_generator)`` returns the app (``create_app({"name": model, ...})`` serves several
models, each on an engine thread of its own); the models load on their engine threads when the app
starts (``/health`` answers 503 until then). The logic of each endpoint lives in a serving class that
never sees HTTP (vLLM's layout): :mod:`.serving_completion`, :mod:`.serving_chat`, :mod:`.serving_models`,
:mod:`.serving_tokenization`, :mod:`.serving_health`, on :mod:`.serving_engine` (admission, a request's
lifetime), with :mod:`.response_builder` turning engine outputs into OpenAI bodies and stream chunks and
:mod:`.state` building them. Here: middleware (Host and Origin checks, body limits, request counting,
CORS), the API key, the routes, and OpenAI-shaped error bodies for whatever FastAPI itself refuses.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..console import log_text
from ..http_guard import LOOPBACK_NAMES, HostOriginGuard
from . import limits as lim
from . import protocol as p
from .http import LimitBody
from .metrics import ServerMetrics
from .state import ServerState

log = logging.getLogger("gpt2lab.server")

_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
           "/detokenize", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/openapi.json", "/docs")


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
               limits: lim.Limits | None = None, allowed_hosts: Sequence[str] = LOOPBACK_NAMES,
               lora_modules: Mapping[str, str | Path] | None = None, allow_runtime_lora: bool = False,
               max_models_memory: int | str | None = None, prefix_cache_mb: float | None = None) -> FastAPI:
    """The server app.

    ``generator_or_model_ref``: a loaded :class:`~gpt2lab.generation.Generator`, or anything
    :func:`gpt2lab.load` accepts (a directory, a bundled name, a Hub id, ``None`` for the default),
    loaded on the engine thread at startup (it decodes through gpt2lab's kernels without further setup);
    or several models, a mapping of served name -> a Generator, a reference or a
    :class:`~gpt2lab.server.state.ModelConfig` (its own device, dtype, quantization and adapters), each
    with its own engine; a request's ``model`` field picks one (none: the first; an unknown name: 404).
    ``lora_modules``: LoRA adapters (name -> folder in ``peft``'s format) on the first model, which a request
    names in ``model``; rows of different adapters and of the base model share one batch.
    ``allow_runtime_lora``: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` may add and remove
    adapters (behind the API key; off by default: 403). ``max_models_memory`` (bytes, or ``"8GB"``): refuse,
    before anything loads, models whose weights, KV caches, prefix caches and adapters need more.
    ``prefix_cache_mb``: each model's pool of cached prompt prefixes (None: sized to the machine; 0: off).
    ``api_key``: required as ``Authorization: Bearer KEY`` on every ``/v1`` route and the tokenizer
    routes. ``max_batch`` sequences decode together, up to
    ``max_queue`` more wait; beyond that requests get 429. ``request_timeout`` (seconds) ends a
    request that runs longer. ``device``, ``dtype``, ``quantization``: how a model loaded here runs (as in
    :func:`gpt2lab.load`; ``quantization`` is passed only when given). ``cors_allow_origins``: origins
    (``https://host:port``, or ``*``) whose browser pages may call the API (CORS, off when empty).
    ``max_body_mb``: larger request bodies get 413; ``limits``: the other per-request bounds
    (:class:`~gpt2lab.server.limits.Limits`). ``allowed_hosts``: the ``Host`` names answered besides the
    loopback ones (:func:`gpt2lab.http_guard.allowed_hosts`; ``["*"]``: any), 403 for others (DNS
    rebinding); a POST must be JSON (415) and, from a browser, come from the server's own origin or one
    of ``cors_allow_origins`` (403) (:class:`~gpt2lab.http_guard.HostOriginGuard`).

    Every client-controlled size is bounded, and tokenizing runs on worker threads, never on the
    event loop: ``/health`` and running streams go on while a big prompt is checked.

    Raises ValueError naming ``max_batch`` (an integer in [1, 1024]), ``max_queue`` (in [0, 65536]),
    ``request_timeout`` (> 0 seconds), ``max_body_mb`` (in (0, 1024]) or ``prefix_cache_mb`` (in [0, 2**20]), and
    naming the models when they would not fit ``max_models_memory``.
    """
    limits = limits or lim.Limits()
    state = ServerState.create(generator_or_model_ref, max_batch=max_batch, max_queue=max_queue,
                               request_timeout=request_timeout, model_name=model_name, device=device, dtype=dtype,
                               quantization=quantization, limits=limits, lora_modules=lora_modules,
                               allow_runtime_lora=allow_runtime_lora, max_models_memory=max_models_memory,
                               prefix_cache_mb=prefix_cache_mb)
    if not (isinstance(max_body_mb, (int, float)) and 0 < max_body_mb <= 1024):
        raise ValueError(f"max_body_mb must be in (0, 1024] megabytes, got {max_body_mb!r}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        state.close()

    app = FastAPI(title="gpt2lab", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible GPT-2 server with continuous batching.")
    app.state.serving, app.state.api_key = state, api_key
    app.state.scheduler, app.state.metrics = state.scheduler, state.metrics
    # the body limit is the middleware's alone: the serving objects never see a body
    app.add_middleware(LimitBody, limits=replace(limits, max_body_bytes=int(max_body_mb * 2**20)))
    app.add_middleware(_CountRequests, metrics=state.metrics)  # outside LimitBody: 413s are counted too
    if cors_allow_origins:  # added last: outermost, so preflights are answered before auth and routing
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    # outermost: a request for another host name, or a cross-site change, is refused before anything runs
    app.add_middleware(HostOriginGuard, hosts=allowed_hosts, origins=cors_allow_origins)
    _install_error_handlers(app)
    app.include_router(router)
    return app


# -- routes: each hands the parsed request to its serving object and sends back what it returns ----------
async def require_key(request: Request) -> None:
    """The API key (``create_app(api_key=...)``) as ``Authorization: Bearer KEY``, or 401."""
    api_key = request.app.state.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest on bytes: constant time whatever the token is (ASCII-only str would raise)
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise p.APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")


def _serving(request: Request) -> ServerState:
    return request.app.state.serving


def _answer(result: Any) -> Any:
    """A serving method's result as HTTP: an APIError as its error body, server-sent events as a stream,
    a response object as is (FastAPI encodes it with the route's ``response_model``)."""
    if isinstance(result, p.APIError):
        return _error_response(result)
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return result


router = APIRouter()
_auth = [Depends(require_key)]
_errors: dict[int | str, dict[str, Any]] = {400: {"model": p.ErrorResponse}, 429: {"model": p.ErrorResponse}}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_playground_html())


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine runs; 503 while loading or if loading failed."""
    report = _serving(request).health.check_health()
    return JSONResponse(report.body, status_code=report.status_code, headers=report.headers)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    metrics = _serving(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)


@router.get("/v1/models", dependencies=_auth, response_model=p.ModelList)
async def list_models(request: Request) -> Any:
    return _answer(await _serving(request).models.show_available_models())


@router.get("/v1/models/{model_id:path}", dependencies=_auth, response_model=p.ModelCard,
            responses={404: {"model": p.ErrorResponse}})
async def retrieve_model(model_id: str, request: Request) -> Any:
    """One model by id (OpenAI's ``models.retrieve``); 404 for any other id."""
    return _answer(await _serving(request).models.retrieve_model(model_id))


@router.post("/v1/load_lora_adapter", dependencies=_auth, response_class=PlainTextResponse,
             responses={400: {"model": p.ErrorResponse}, 403: {"model": p.ErrorResponse}})
async def load_lora_adapter(body: p.LoadLoRAAdapterRequest, request: Request) -> Any:
    """Load a LoRA adapter at run time (vLLM's endpoint; only with ``--allow-runtime-lora``)."""
    return _answer(await _serving(request).models.load_lora_adapter(body))


@router.post("/v1/unload_lora_adapter", dependencies=_auth, response_class=PlainTextResponse,
             responses={404: {"model": p.ErrorResponse}, 403: {"model": p.ErrorResponse}})
async def unload_lora_adapter(body: p.UnloadLoRAAdapterRequest, request: Request) -> Any:
    """Unload a LoRA adapter at run time (vLLM's endpoint; only with ``--allow-runtime-lora``)."""
    return _answer(await _serving(request).models.unload_lora_adapter(body))


@router.post("/tokenize", dependencies=_auth, response_model=p.TokenizeResponse, responses=_errors)
async def tokenize(body: p.TokenizeRequest, request: Request) -> Any:
    return _answer(await _serving(request).tokenization.create_tokenize(body))


@router.post("/detokenize", dependencies=_auth, response_model=p.DetokenizeResponse, responses=_errors)
async def detokenize(body: p.DetokenizeRequest, request: Request) -> Any:
    return _answer(await _serving(request).tokenization.create_detokenize(body))


@router.post("/v1/completions", dependencies=_auth, response_model=p.CompletionResponse, responses=_errors)
async def completions(body: p.CompletionRequest, request: Request) -> Any:
    """OpenAI completions: prompt(s) in, n completions each; ``stream`` for server-sent events."""
    return _answer(await _serving(request).completion.create_completion(body, request.is_disconnected))


@router.post("/v1/chat/completions", dependencies=_auth, response_model=p.ChatCompletionResponse,
             responses=_errors)
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
    """OpenAI chat completions: messages rendered by the model's chat template (as ``gpt2lab chat``)."""
    return _answer(await _serving(request).chat.create_chat_completion(body, request.is_disconnected))


# -- errors --------------------------------------------------------------------------------------
def _error_response(exc: p.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.APIError)
    async def api_error(request: Request, exc: p.APIError) -> JSONResponse:
        return _error_response(exc)

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
        log.exception("gpt2lab: unhandled error on %s", log_text(request.url.path))  # the client's path, decoded
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

