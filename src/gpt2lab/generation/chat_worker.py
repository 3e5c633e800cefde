"""Chat prompts rendered in worker processes: a checkpoint's chat template is code, so a server runs it
where it can neither hold the GIL of the process that streams other clients' tokens nor outlive its time.

A render in a thread of the serving process would compete for the GIL with the event loop and the
engine thread: a template that computes for seconds (the sandbox lets it run until its deadline) would
stretch every other stream's token gaps. :class:`ChatRenderPool` keeps a few worker processes (spawned:
they import the chat layout and the tokenizer, not torch) that each render one conversation at a time
(:func:`~gpt2lab.generation.chat_format.build_prompt_messages`: the template, the tokenizer, the oldest
turns dropped to fit). :meth:`ChatRenderPool.render` waits for the answer at most ``timeout`` seconds;
past that the worker is killed (the render stops there, whatever it was doing) and replaced.

The worker sends back what went wrong as the exception's kind: a ``ValueError`` is the messages' fault
(the template refused them, they do not fit), a :class:`~gpt2lab.errors.CheckpointError` the template's
(it is broken, or crossed the sandbox's bounds: ``ChatTemplateFault``), anything else a failure of the
render itself; :class:`RenderFailed` carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..tokenizer import Tokenizer
    from .chat_format import ChatPrompt, ChatStyle


class RenderFailed(Exception):
    """A render that did not produce a prompt. ``kind``: ``"messages"`` (the messages' fault: the template
    refused them, or they do not fit), ``"template"`` (the template's: broken or over its bounds),
    ``"timeout"`` (the render ran past its time and its worker was stopped) or ``"worker"`` (the worker
    process failed)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RenderJob:
    """One conversation to render: OpenAI-style ``messages`` (roles system/user/assistant), the token budget
    and transformers' / vLLM's ``add_generation_prompt`` and ``continue_final_message``."""

    messages: Sequence[Mapping[str, str]]
    max_tokens: int
    add_generation_prompt: bool = True
    continue_final_message: bool = False


def _render(job: RenderJob, tokenizer: Tokenizer, style: ChatStyle) -> ChatPrompt:
    from .chat_format import build_prompt_messages, from_messages

    from_messages(job.messages)  # checks roles and contents (ValueError naming the message)
    return build_prompt_messages(job.messages, tokenizer, style, job.max_tokens,
                                 add_generation_prompt=job.add_generation_prompt,
                                 continue_final_message=job.continue_final_message)


PROBE = "probe"  # the job that checks the template on a plain conversation (a server's start-up)


def probe_style(style: ChatStyle) -> str:
    """The template's text for a plain conversation, its end of turn worked out
    (:meth:`~gpt2lab.generation.chat_template.ChatTemplate.probe`): what a server checks at start-up. A
    broken template raises :class:`~gpt2lab.generation.chat_template.ChatTemplateFault` naming it."""
    return style.chat_template.probe()


def _kind(exc: BaseException) -> str:
    if isinstance(exc, CheckpointError):
        return "template"
    return "messages" if isinstance(exc, ValueError) else "worker"


def _serve(conn: Connection, tokenizer: Tokenizer, style: ChatStyle) -> None:
    """A worker's loop: a :class:`RenderJob` in, ``("ok", ChatPrompt)`` or ``("error", kind, message)`` out."""
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the server went away
            return
        try:
            conn.send(("ok", probe_style(style) if job == PROBE else _render(job, tokenizer, style)))
        except Exception as exc:  # every failure goes back to the caller, which decides whose fault it is
            conn.send(("error", _kind(exc), str(exc)))


_main_lock = threading.Lock()


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """While a worker is spawned: hide the parent's ``__main__`` from multiprocessing, which would otherwise
    re-run that script in the child to find objects pickled from it. A worker needs nothing from it (its
    target and arguments live in gpt2lab), and a script that builds a server at its top level without an
    ``if __name__ == "__main__":`` guard (docs/server.md's snippet, as users write it) would build one more
    server in every worker, whose own pool then fails to start while bootstrapping."""
    main = sys.modules.get("__main__")
    with _main_lock:
        if main is None:
            yield
            return
        saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _Worker:
    def __init__(self, context: Any, tokenizer: Tokenizer, style: ChatStyle) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, tokenizer, style), name="gpt2lab-chat-render",
                                       daemon=True)
        with _main_not_rerun():
            self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        """Whether the worker has started (waiting at most ``timeout`` seconds)."""
        if not self.ready and self.conn.poll(timeout):
            self.conn.recv()
            self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class ChatRenderPool:
    """``workers`` processes rendering conversations for ``tokenizer`` in the layout ``style`` (see the
    module). Thread-safe: :meth:`render` blocks its thread (waiting, not computing) until a worker is free
    and has answered. ``stopped`` counts the renders stopped for running out of time."""

    def __init__(self, tokenizer: Tokenizer, style: ChatStyle, workers: int = 2) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self.tokenizer, self.style = tokenizer, style
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with threads and torch
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None  # see render_async
        self.workers = workers
        self.stopped = 0
        for _ in range(workers):
            self._add()

    def _add(self) -> None:
        with self._lock:
            if self._closed:
                return
            worker = _Worker(self._context, self.tokenizer, self.style)
            self._all.append(worker)
        self._idle.put(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        self._add()  # a fresh one in its place

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (for monitoring)."""
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None]

    def render(self, job: RenderJob, timeout: float) -> ChatPrompt:
        """``job`` rendered within ``timeout`` seconds (waiting for a free worker included), or
        :class:`RenderFailed` saying why not."""
        deadline = time.monotonic() + timeout
        try:
            worker = self._idle.get(timeout=max(timeout, 0))
        except queue.Empty:
            raise RenderFailed("timeout", f"no chat render worker was free within {timeout:g} s") from None
        try:
            if not worker.wait_ready(max(deadline - time.monotonic(), 0)):  # a new worker still importing
                raise RenderFailed("timeout", f"the chat render worker was still starting after {timeout:g} s")
            worker.conn.send(job)
            if not worker.conn.poll(max(deadline - time.monotonic(), 0)):
                self.stopped += 1
                self._discard(worker)  # the render stops here: its process is killed
                worker = None
                raise RenderFailed("timeout", f"rendering the conversation took longer than {timeout:g} s and "
                                   "was stopped")
            answer = worker.conn.recv()
        except (EOFError, OSError) as exc:  # the worker died (killed, out of memory)
            if worker is not None:
                self._discard(worker)
                worker = None
            raise RenderFailed("worker", f"the chat render worker failed: {exc or type(exc).__name__}") from None
        finally:
            if worker is not None:
                self._idle.put(worker)
        if answer[0] == "ok":
            return answer[1]
        raise RenderFailed(answer[1], answer[2])

    async def render_async(self, job: RenderJob, timeout: float) -> ChatPrompt:
        """:meth:`render` from a coroutine: a request waits for a free worker on the event loop, not on a
        thread, so renders queued behind slow ones hold at most ``workers`` threads (a server's thread pool
        stays free for the other requests' tokenizing). ``timeout`` covers the wait."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:  # a semaphore belongs to one event loop
            self._slots = (loop, asyncio.Semaphore(self.workers))
        slots = self._slots[1]
        try:
            await asyncio.wait_for(slots.acquire(), max(timeout, 0))
        except asyncio.TimeoutError:
            raise RenderFailed("timeout", f"no chat render worker was free within {timeout:g} s") from None
        try:
            return await asyncio.to_thread(self.render, job, deadline - time.monotonic())
        finally:
            slots.release()

    def probe(self, timeout: float) -> str:
        """A worker renders the probe conversation (see :func:`probe_style`) within ``timeout`` seconds, its start
        included: the rendered text, or :class:`RenderFailed` (``kind`` ``"template"`` for a broken
        template)."""
        return self.render(PROBE, timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), []
        for worker in workers:
            worker.stop()
