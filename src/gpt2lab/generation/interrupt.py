"""Stopping the Python code a thread runs once a deadline passes: the backstop of a bounded render.

:mod:`~gpt2lab.generation.jinja_sandbox` checks a render's deadline in every hook a compiled template
goes through, but a single filter is one step for those hooks, and some of Jinja's filters are long
Python loops of their own: ``wordwrap``, ``urlize``, ``title`` or ``batch`` over a value of the largest
size a render allows ran for 15 to 80 seconds past a 2-second bound. :func:`deadline` is the backstop:
a single watchdog thread raises :class:`Interrupted` in the watched thread when its deadline passes
(CPython's ``PyThreadState_SetAsyncExc``, the mechanism behind ``KeyboardInterrupt``-style timeouts in
pure Python), so any Python code the thread is running stops at its next bytecode boundary. A single C
call still runs to its end -- which is why the sandbox also bounds every value's size, so no one C call
has much to do.

:class:`Interrupted` is a ``BaseException``, as ``KeyboardInterrupt`` is: the ``except Exception`` of
the code it interrupts (a filter's own error handling) does not swallow it. It is raised at most once
per :func:`deadline`, only while its ``with`` block runs: one not yet delivered when the block ends is
withdrawn. On Python implementations other than CPython :func:`deadline` watches nothing (the hooks'
checks remain).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_CPYTHON = platform.python_implementation() == "CPython"


class Interrupted(BaseException):
    """Raised in a thread whose :func:`deadline` passed (a ``BaseException``: see the module docstring)."""


class _Watch:
    __slots__ = ("thread_id", "active", "fired")

    def __init__(self, thread_id: int) -> None:
        self.thread_id, self.active, self.fired = thread_id, True, False


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Have ``thread_id`` raise ``exception`` at its next bytecode boundary (``None``: withdraw it)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exception) if exception is not None else None)


class _Watchdog:
    """One daemon thread for every watched deadline of the process (a heap of them): starting a watch is
    a lock and a heap push, not a thread."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, when: float) -> _Watch:
        watch = _Watch(threading.get_ident())
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._order), watch))
            if self._thread is None:  # started on first use
                self._thread = threading.Thread(target=self._run, name="gpt2lab-render-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._lock.notify()  # the new deadline is the nearest: wake the watchdog to wait less
        return watch

    def stop(self, watch: _Watch) -> None:
        with self._lock:
            watch.active = False
            if watch.fired:  # raised, maybe not delivered yet: withdraw it (a no-op once delivered)
                _raise_in(watch.thread_id, None)

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._lock.wait()
                    continue
                when, _, watch = self._heap[0]
                left = when - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                heapq.heappop(self._heap)
                watch.fired = True
                _raise_in(watch.thread_id, Interrupted)


_watchdog = _Watchdog()


def _after_fork() -> None:
    global _watchdog
    _watchdog = _Watchdog()  # the parent's thread is not in the child, and its lock may have been held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Run the ``with`` block in the calling thread for at most about ``seconds`` (wall clock): past it,
    :class:`Interrupted` is raised wherever the thread's Python code is. The caller catches it outside
    the block (``try: with deadline(t): ... except Interrupted: ...``): it may surface anywhere inside,
    the block's own cleanup included."""
    if not _CPYTHON:
        yield
        return
    watch = _watchdog.start(time.monotonic() + seconds)
    try:
        yield
    finally:
        _watchdog.stop(watch)
