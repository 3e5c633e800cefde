"""The engine loop: ONE thread owns the model and steps its :class:`~gpt2lab.generation.Runner` while anything
is unfinished.

HTTP handlers live on the asyncio event loop and never touch the model. They send commands (add,
abort, call) through a thread-safe inbox; the loop thread applies them between steps, so a new
request joins the running batch at the next step and a finished or aborted one leaves it. Each
step's outputs go back to the handler's ``asyncio.Queue`` with ``call_soon_threadsafe``. Stepping,
collecting and telling failed requests apart are the runner's (``Runner.step``, ``errors="return"``), as for
every other front end; this module adds the thread, the inbox, capacity and the routing to HTTP requests.
A beam request is ``n`` rows of the batch like ``n`` samples: it never stalls the other streams.

Capacity is counted in sequences (prompts x n): at most ``max_batch`` run, at most ``max_queue``
more wait; beyond that :meth:`Scheduler.reserve` says no and the handler answers 429.

A server of several models has one scheduler (one engine thread) per model. Their steps take turns
(:class:`TurnLock`): two models computing at once on the same cores would only slow each other down
(gpt2lab's kernels use every core for one forward), and the turns go in arrival order, so a busy model
never starves another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..console import log_text
from ..sampling import SamplingParams
from .metrics import ModelMetrics, ServerMetrics

log = logging.getLogger("gpt2lab.server")


class EngineFailure(RuntimeError):
    """The engine raised while stepping (a fault no one request caused: out of memory, a broken
    model); every request in flight ends with this (a server error), and the server keeps serving."""


class RequestFailed(RuntimeError):
    """One of this request's sequences faulted inside a step; this request alone ends with it."""


@dataclass
class _Stream:
    """Where the outputs of one HTTP request's engine requests go (one queue for all its prompts)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_ids: list[str]
    sequences: int  # prompts x n: the capacity it reserved
    unfinished: set[str] = field(default_factory=set)  # its engine requests still going
    released: bool = False  # its reserved capacity went back (finished, aborted or failed)


class TurnLock:
    """A lock handed over in the order it was asked for (``threading.Lock`` lets a thread that releases it
    take it again at once, so one busy engine thread could keep the others waiting)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> TurnLock:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class RequestHandle:
    """The engine requests of one HTTP request, as seen from the event loop."""

    def __init__(self, scheduler: Scheduler, stream: _Stream) -> None:
        self.scheduler, self._stream = scheduler, stream
        self.done = False
        self._finished = 0  # sequences whose last output this side has consumed

    async def next(self, timeout: float | None) -> list[Any]:
        """The next step's outputs (``RequestOutput`` list); ``asyncio.TimeoutError`` after ``timeout`` s."""
        item = await asyncio.wait_for(self._stream.queue.get(), timeout)
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self._finished += sum(out.finished for out in item)
        if self._finished >= self._stream.sequences:
            self.done = True
        return item

    def abort(self) -> None:
        """Stop generating for this request (no-op once every sequence finished)."""
        if not self.done:
            self.done = True
            self.scheduler.abort(self._stream.request_ids)


class Scheduler:
    """Owns the model thread of one served model. ``load`` builds the Generator on that thread (so /health
    turns ready only when the weights are in memory); ``metrics``: the server's, labelled with ``name`` (None:
    the loaded model's own name); ``turns``: the lock the steps of a server's models take turns with (None:
    this model alone)."""

    def __init__(self, load: Callable[[], Any], *, max_batch: int, max_queue: int,
                 metrics: ServerMetrics, model_is_callers: bool = False, name: str | None = None,
                 turns: TurnLock | None = None) -> None:
        self._load, self.name, self._server_metrics = load, name, metrics
        self._turns = turns if turns is not None else contextlib.nullcontext()
        # the caller's own Generator (create_app(generator)): other threads may change its model at any time
        # (train it, swap its tensors), so every forward checks the runner against it
        self.model_is_callers = model_is_callers
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics: ModelMetrics | None = None  # once the model is loaded (its label is its name)
        self.generator: Any = None
        self.runner: Any = None  # the generation Runner (errors="return": a failed request is reported)
        self.engine: Any = None  # the runner's Engine (its check_request is the handlers' admission check)
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._reserved = 0
        self._stopping = False
        self.engine_failures = 0  # steps that failed as a whole (not attributable to one request)
        self.last_engine_error: str | None = None  # cleared by the next step that succeeds
        self.request_failures = 0  # requests ended by a fault of their own inside a step
        self._counted = (0, 0, 0, 0)  # engine counters already added to the metrics (prefill, hits, misses, saved)
        self._thread = threading.Thread(target=self._run, name=f"gpt2lab-engine-{name or 'model'}", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    # -- capacity (event loop side) -------------------------------------------------------------
    def reserve(self, sequences: int) -> bool:
        with self._lock:
            if self._reserved + sequences > self.capacity:
                return False
            self._reserved += sequences
            if self.metrics is not None:
                self.metrics.in_flight.set(self._reserved)
            return True

    def release(self, sequences: int) -> None:
        with self._lock:
            self._reserved -= sequences
            if self.metrics is not None:
                self.metrics.in_flight.set(self._reserved)

    # -- commands (event loop side) -------------------------------------------------------------
    async def submit(self, requests: list[tuple[list[int], SamplingParams, str]], *,
                     adapter: str | None = None) -> RequestHandle:
        """Queue engine requests ``(prompt_ids, params, request_id)`` for the next step, all or none, with the
        LoRA ``adapter`` of that name (None: the base model); raises the engine's ValueError if it refuses one.

        The caller has reserved ``sum(n)`` sequences. Once this returns, the model thread gives them
        back when the request finishes, is aborted or fails (so a handler that never reads its
        outputs cannot leak capacity); if it raises, they have been given back already."""
        request_ids = [rid for _, _, rid in requests]
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request_ids,
                         sum(params.n for _, params, _ in requests), set(request_ids))
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", (requests, adapter, stream, accepted)))
        try:
            await asyncio.shield(asyncio.wrap_future(accepted))  # the engine's ValueError is raised here
        except asyncio.CancelledError:  # the handler went away: undo whatever the model thread does

            def undo(future: concurrent.futures.Future) -> None:
                if future.exception() is None:
                    self.abort(request_ids)
                else:
                    self.release(stream.sequences)

            accepted.add_done_callback(undo)
            raise
        except BaseException:
            self.release(stream.sequences)
            raise
        return RequestHandle(self, stream)

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(("abort", request_ids))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(generator)`` on the model thread between steps (scoring, for echo + logprobs)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, future)))
        return await asyncio.wrap_future(future)

    # -- the model thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            from ..generation import Runner

            with self._turns:  # loading computes too (quantizing, adapters)
                generator = self._load()
            self.metrics = self._server_metrics.for_model(self.name or generator.name)
            self.generator = generator
            engine = self.generator.engine(max_batch=self.max_batch)  # its LoRA adapters and prefix cache
            self.runner, self.engine = Runner(engine, errors="return", collect=False), engine
        except BaseException as exc:  # noqa: BLE001 - reported by /health and the CLI
            self.load_error = exc
            log.error("gpt2lab: cannot load the model: %s", exc)
            self.ready.set()
            return
        self.ready.set()
        import torch

        from ..runtime import unchanged_weights

        # the KV cache holds inference tensors, and aborts move its rows too. A model the server loaded is this
        # thread's alone, and only a "call" command may change it (recheck_weights after each); the caller's may
        # change between any two forwards
        held = contextlib.nullcontext() if self.model_is_callers else unchanged_weights(self.generator.model)
        with torch.inference_mode(), held:
            self._loop()
        self._fail_all(EngineFailure("the server is shutting down"))

    def _loop(self) -> None:
        while not self._stopping:
            # block for a command only when there is nothing to decode
            command = self._next_command(block=not self.runner.has_unfinished())
            while command is not None:
                try:
                    self._apply(*command)
                except Exception:  # noqa: BLE001 - keep serving; the failure is a bug to log
                    log.exception("gpt2lab: engine command %r failed", command[0])
                command = self._next_command(block=False)
            if self._stopping:
                break
            if self.runner.has_unfinished():
                self._step()
            self._update_gauges()

    def _next_command(self, block: bool) -> tuple[str, Any] | None:
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return None

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            requests, adapter, stream, accepted = payload
            added = []
            try:
                for prompt_ids, params, request_id in requests:
                    self.runner.add(prompt_ids, params, request_id=request_id, adapter=adapter)
                    added.append(request_id)
            except Exception as exc:  # noqa: BLE001 - handed to the request's handler
                for request_id in added:
                    self.runner.abort(request_id)
                accepted.set_exception(exc)
                return
            for request_id in added:
                self._streams[request_id] = stream
            self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _, _ in requests))
            accepted.set_result(None)
        elif kind == "abort":
            for request_id in payload:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    self.runner.abort(request_id)
                    self._release_stream(stream)
        elif kind == "call":
            from ..runtime import recheck_weights

            fn, future = payload
            try:
                with self._turns:
                    result = fn(self.generator)
                future.set_result(result)
            except Exception as exc:  # noqa: BLE001
                future.set_exception(exc)
            finally:
                recheck_weights(self.generator.model)  # fn may have changed the model

    def _step(self) -> None:
        running = self.engine.num_running
        try:
            with self._turns:
                start = time.perf_counter()
                step = self.runner.step()
        except Exception as exc:  # noqa: BLE001 - a bug, not a client error: fail what is in flight
            log.exception("gpt2lab: engine step failed")
            self.engine_failures += 1
            self.last_engine_error = f"{type(exc).__name__}: {exc}"
            self.metrics.engine_failures.inc()
            for request_id in list(self._streams):
                try:
                    self.runner.abort(request_id)
                except Exception:  # noqa: BLE001
                    log.exception("gpt2lab: abort after a failed step failed")
            self._fail_all(EngineFailure(f"generation failed: {exc}"))
            return
        self.last_engine_error = None
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(max(running, self.engine.num_running))
        for request_id, error in step.failed.items():  # it ends its whole HTTP request, and nothing else
            if request_id in self._streams:
                self._fail_request(self._streams[request_id], error)
        grouped: dict[int, tuple[_Stream, list[Any]]] = {}  # one queue item per HTTP request per step
        for out in step.outputs:
            self.metrics.generation_tokens.inc(len(out.token_ids))
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            grouped.setdefault(id(stream), (stream, []))[1].append(out)
        for request_id in step.finished:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.unfinished.discard(request_id)
        for stream, outs in grouped.values():
            if not stream.unfinished:
                self._release_stream(stream)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, outs)

    def _release_stream(self, stream: _Stream) -> None:
        if not stream.released:
            stream.released = True
            self.release(stream.sequences)

    def _fail_request(self, stream: _Stream, error: str) -> None:
        self.request_failures += 1
        # the request id is the client's (vLLM's request_id) and the error may quote the request: one escaped line
        log.error("gpt2lab: request %s failed inside a step: %s", log_text(stream.request_ids[0].rsplit("-", 1)[0]),
                  log_text(error))
        for request_id in stream.request_ids:
            if self._streams.pop(request_id, None) is not None:
                self.runner.abort(request_id)  # its other prompts and samples
        self._release_stream(stream)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, RequestFailed(error))

    def _fail_all(self, exc: BaseException) -> None:
        for stream in {id(s): s for s in self._streams.values()}.values():
            self._release_stream(stream)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
        self._streams.clear()

    def _update_gauges(self) -> None:
        engine, metrics = self.engine, self.metrics
        metrics.running.set(engine.num_running)
        with self._lock:
            metrics.queue_depth.set(max(0, self._reserved - engine.num_running))
        pool = engine.prefix_cache
        stats = pool.stats if pool is not None else None
        now = (engine.prefill_tokens, *((stats.hits, stats.misses, stats.saved_tokens) if stats else (0, 0, 0)))
        for counter, new, old in zip((metrics.prefill_tokens, metrics.prefix_hits, metrics.prefix_misses,
                                      metrics.prefix_saved), now, self._counted):
            if new > old:
                counter.inc(new - old)
        self._counted = now
        metrics.prefix_bytes.set(pool.bytes if pool is not None else 0)
        metrics.prefix_blocks.set(len(pool) if pool is not None else 0)


DISCONNECT_POLL_S = 0.25


async def iterate(handle: RequestHandle, deadline: float,
                  disconnected: Callable[[], Any] | None = None) -> AsyncIterator[list[Any]]:
    """Yield a request's outputs step by step until every sequence finished.

    Raises ``TimeoutError`` past ``deadline`` (``time.monotonic()``); with ``disconnected`` (an async
    predicate), checks every ``DISCONNECT_POLL_S`` whether the client left -- also while outputs keep
    coming -- and raises ``ConnectionAbortedError``. The request is aborted in the engine on any early exit.
    """
    next_poll = time.monotonic() + DISCONNECT_POLL_S
    try:
        while not handle.done:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            if disconnected is not None and now >= next_poll:
                if await disconnected():
                    raise ConnectionAbortedError
                next_poll = now + DISCONNECT_POLL_S
            wait = deadline - now if disconnected is None else min(deadline, next_poll) - now
            try:
                outs = await handle.next(max(wait, 0.0))
            except asyncio.TimeoutError:
                continue
            yield outs
    finally:
        handle.abort()
