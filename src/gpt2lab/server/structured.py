"""Structured outputs on the API: the request fields that ask for one, and compiling its grammar off the event loop.

A request asks with exactly one of OpenAI's ``response_format`` (``{"type": "text"}``: none;
``{"type": "json_object"}``; ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``), vLLM's
``structured_outputs`` object (:class:`~gpt2lab.sampling.StructuredOutputsParams`' fields) or vLLM's legacy
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (with ``guided_whitespace_pattern``;
``guided_decoding_backend`` is accepted and ignored: llguidance is the one engine). ``strict`` is accepted either
way: the output always matches the schema.

A hostile spec cannot stall the server: its JSON text is bounded (``Limits.max_structured_chars``, checked on
the loop before anything else), it compiles on a worker thread within ``Limits.structured_compile_s`` seconds
and llguidance's own parser limits (a 400 naming the field either way), and compiled grammars are cached by
their text, so the same schema compiles once. Compiles run on their own small thread pool
(``COMPILE_THREADS``), never on the one that tokenizes and renders every other request, and at most
``MAX_COMPILES`` are running or waiting at once: more is a 429 ``server_busy`` at once. A compile abandoned at
its time limit keeps its place until its thread is done, so repeating slow specs cannot pile up work.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..sampling.structured import StructuredOutputsParams, compiled_matcher, tokenizer_grammars
from . import limits as lim
from . import protocol as p

COMPILE_THREADS = 2  # grammar compiles at once, in every server of this process (each is CPU-bound)
MAX_COMPILES = 16  # running or waiting; more is a 429
_compiles = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="gpt2lab-structured-compile")
_pending = 0  # compiles submitted and not finished (an abandoned one included)
_pending_lock = threading.Lock()


def _finished(_future: Any) -> None:
    global _pending
    with _pending_lock:
        _pending -= 1


def _submit_compile(spec: StructuredOutputsParams, tokenizer: Any) -> asyncio.Future:
    """``compiled_matcher(spec, tokenizer)`` on the compile pool; 429 when ``MAX_COMPILES`` are pending."""
    global _pending
    with _pending_lock:
        if _pending >= MAX_COMPILES:
            raise p.APIError(429, f"{MAX_COMPILES} structured outputs are compiling on this server; retry after "
                             "1 s", type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        _pending += 1
    future = _compiles.submit(compiled_matcher, spec, tokenizer)
    future.add_done_callback(_finished)
    return asyncio.wrap_future(future)


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def requested_spec(request: Any, limits: lim.Limits) -> tuple[StructuredOutputsParams | None, str]:
    """The structured output a request asks for (None: plain text) and the field it came from; a 400
    naming the field when it is malformed, over the size limit, or given in two ways."""
    asked: list[tuple[str, dict[str, Any]]] = []
    fmt = request.response_format
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            inner = fmt.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise p.invalid('response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                                '"schema": {...}}, with the JSON Schema as an object', "response_format")
            if not isinstance(inner.get("strict", False), (bool, type(None))):
                raise p.invalid("response_format.json_schema.strict must be true or false", "response_format")
            asked.append(("response_format", {"json": inner["schema"]}))
        elif kind != "text":
            raise p.invalid(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                            "response_format")
    if request.structured_outputs is not None:
        asked.append(("structured_outputs", request.structured_outputs))
    named = [name for name in _GUIDED if getattr(request, name) is not None]
    if len(named) > 1:  # named as the client wrote them, not as the library's kinds
        raise p.invalid(f"give one structured output, not {' and '.join(named)}", named[1])
    if named:
        guided = {_GUIDED[named[0]]: getattr(request, named[0])}
        if request.guided_whitespace_pattern is not None:
            guided["whitespace_pattern"] = request.guided_whitespace_pattern
        asked.append((named[0], guided))
    elif request.guided_whitespace_pattern is not None:
        raise p.invalid("guided_whitespace_pattern goes with guided_json", "guided_whitespace_pattern")
    if not asked:
        return None, ""
    if len(asked) > 1:
        raise p.invalid(f"give one structured output, not {' and '.join(name for name, _ in asked)}", asked[1][0])
    field, value = asked[0]
    size = len(json.dumps(value, ensure_ascii=False))
    if size > limits.max_structured_chars:
        raise p.invalid(f"{field}: the structured output spec has {size} characters as JSON, more than this "
                        f"server's limit of {limits.max_structured_chars}", field, "limit_exceeded")
    try:
        return StructuredOutputsParams.from_dict(value, field), field
    except ValueError as exc:
        raise spec_error(exc, field) from None


def spec_error(exc: Exception, field: str) -> p.APIError:
    """A structured-output ``ValueError`` (``structured_outputs.json: ...``) or missing extra as a 400 naming
    the request field it came from."""
    message = str(exc)
    if message.startswith("structured_outputs") and field != "structured_outputs":
        head, _, rest = message.partition(" ")
        message = f"{field}: {rest}" if head.endswith(":") else f"{field} {rest}"
    return p.invalid(message, field)


async def compile_spec(spec: StructuredOutputsParams, field: str, tokenizer: Any, limits: lim.Limits) -> None:
    """Compile ``spec`` for ``tokenizer`` on a worker thread (cached: once per spec), within
    ``limits.structured_compile_s`` seconds: 400 naming ``field`` when it is invalid or too slow to compile."""
    try:
        await run_in_threadpool(tokenizer_grammars, tokenizer)  # once per tokenizer (about a second), not bounded
        # shield: at the time limit the request stops waiting; the compile finishes on its thread (and is cached)
        await asyncio.wait_for(asyncio.shield(_submit_compile(spec, tokenizer)), limits.structured_compile_s)
    except asyncio.TimeoutError:
        # the worker finishes on its own: llguidance's parser limits bound its work
        raise p.invalid(f"{field}: compiling this structured output took more than this server's limit of "
                        f"{limits.structured_compile_s:g} s; simplify the schema or grammar", field,
                        "limit_exceeded") from None
    except (ValueError, ImportError) as exc:
        raise spec_error(exc, field) from None
