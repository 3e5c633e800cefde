"""How many threads the C kernels' forward runs on: ``auto`` (the default) or a pinned count.

Why not simply every core: the kernels' threads meet at a barrier several times per layer, so on a
machine where another process keeps one core busy, a descheduled thread stalls the others (measured,
GPT-2 124M fp32, 200 tokens with one core busy: 14.5 s on 2 threads, 9.2 s on 1; idle, 8.8 s and
8.7 s). No fixed count is best both ways, and the load changes while a server runs. So ``auto`` measures:
:class:`ThreadTuner` times each forward, per kind of forward (prefill or decode, and the number of
tokens by powers of two: batch-1 decode is bound by memory bandwidth, prefill and batched decode by
compute), tries each candidate count once, then runs the fastest and now and then one other count
again (after :data:`EXPLORE_EVERY` forwards times how much slower it was) so that a change in load is
noticed. The candidates
are 1 up to :func:`usable_cpus`, the CPUs this process may run on (``os.sched_getaffinity``, and a
cgroup v2 ``cpu.max`` quota), capped by ``torch.get_num_threads()``. Threads never change a result
(every output element is computed the same way whoever computes it; see ``kernels.c``).

``--threads N`` (``set_threads(N)``) pins N: no timing, no exploring. The same idea as the auto-tuning
of thread counts in ONNX Runtime and llama.cpp's ``--threads`` / ``--threads-batch`` split, made online.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

__all__ = ["AUTO", "EXPLORE_EVERY", "ThreadTuner", "pinned_threads", "set_threads", "usable_cpus"]

AUTO = "auto"
# another count is re-measured after EXPLORE_EVERY x (its time / the best's) forwards: whatever how much slower
# it is, re-measuring it costs about 1 / EXPLORE_EVERY (~3%) of the time (measured with the machine loaded:
# 2 threads 16x slower than 1, where a fixed interval lost more than half the speed)
EXPLORE_EVERY = 32
_ALPHA = 0.5  # weight of a slower time in a running estimate (a faster one is taken as it is: see record)

_pinned: int | None = None
# auto also sets torch's intra-op count to the count it chose, so that the torch operators of the same step
# (sampling's softmax over 50k logits runs on 2 threads) do not stall on a busy core either; _cap keeps the
# count torch had before (or that the caller set since), the most auto may use
_cap: int | None = None
_set_by_auto: int | None = None


def set_threads(threads: int | str) -> None:
    """``"auto"``: the kernels choose per forward (:class:`ThreadTuner`, which sets torch's intra-op count
    to its choice too, never above the count torch had); an integer N: they always use N, and torch's own
    thread pools are set to N too. Raises ``ValueError`` naming ``threads`` for anything
    else (an integer must be in [1, 1024])."""
    global _pinned
    if isinstance(threads, str) and threads.strip().lower() == AUTO:
        _pinned = None
        return
    from ..placement import set_threads as set_torch_threads

    set_torch_threads(threads, "threads")  # checks it
    _pinned = threads


def pinned_threads() -> int | None:
    """The count :func:`set_threads` pinned, or None for ``auto``."""
    return _pinned


_cpus_seen: tuple[float, int] = (-math.inf, 1)  # (when, usable_cpus()): read again after _CPUS_TTL_S
_CPUS_TTL_S = 5.0


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a container's cpuset), reduced by
    a cgroup v2 CPU quota (``cpu.max``: a container given 1.5 CPUs of 8 gets 2), at least 1. Read again
    at most every few seconds (it is asked before every forward; the file read costs tens of microseconds)."""
    global _cpus_seen
    now = time.monotonic()
    if now - _cpus_seen[0] > _CPUS_TTL_S:
        _cpus_seen = (now, _read_usable_cpus())
    return _cpus_seen[1]


def _read_usable_cpus() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _candidates(most: int) -> tuple[int, ...]:
    """``most``, halvings of it, and 1: a few counts worth timing, largest first."""
    counts = {most, 1}
    half = most // 2
    while half > 1:
        counts.add(half)
        half //= 2
    return tuple(sorted(counts, reverse=True))


class _Phase:
    """Running time estimates per candidate count for one kind of forward."""

    __slots__ = ("estimates", "samples", "calls", "last_tried")

    def __init__(self, candidates: tuple[int, ...]) -> None:
        self.estimates = dict.fromkeys(candidates, math.inf)
        self.samples = dict.fromkeys(candidates, 0)
        self.last_tried = dict.fromkeys(candidates, 0)
        self.calls = 0


class ThreadTuner:
    """Chooses the thread count of each kernel forward: pinned, or measured (see the module's docstring).

    Use: ``threads = tuner.choose(n_tok, prefill)``, run the forward, ``tuner.record(...)`` with its seconds.
    """

    def __init__(self) -> None:
        self._phases: dict[tuple, _Phase] = {}

    @staticmethod
    def most() -> int:
        """The largest count a forward may use now (its scratch memory is sized for it)."""
        global _cap
        if _pinned is not None:
            return _pinned
        now = torch.get_num_threads()
        if _cap is None or now != _set_by_auto:  # first use, or someone else set torch's count since
            _cap = now
        return max(1, min(_cap, usable_cpus()))

    def choose(self, n_tok: int, prefill: bool) -> tuple[int, tuple | None]:
        """``(threads, key)`` for a forward of ``n_tok`` tokens; ``key`` None when there is nothing to
        time (pinned, or one candidate), else what :meth:`record` takes back."""
        global _set_by_auto
        most = self.most()
        if _pinned is not None or most == 1:
            return most, None
        key = (prefill, n_tok.bit_length(), most)
        threads, key = self._choose(key, most)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            _set_by_auto = threads
        return threads, key

    def _choose(self, key: tuple, most: int) -> tuple[int, tuple]:
        phase = self._phases.get(key)
        if phase is None:
            phase = self._phases[key] = _Phase(_candidates(most))
        phase.calls += 1
        for count, seen in phase.samples.items():  # each candidate timed once first, the largest first
            if not seen:
                return count, key
        best = min(phase.estimates, key=phase.estimates.__getitem__)
        for other in sorted(phase.estimates, key=phase.last_tried.__getitem__):  # longest unmeasured first
            if other != best and (phase.calls - phase.last_tried[other]
                                  >= EXPLORE_EVERY * phase.estimates[other] / phase.estimates[best]):
                return other, key
        return best, key

    def record(self, key: tuple | None, threads: int, seconds: float) -> None:
        """The time a forward chosen by :meth:`choose` took (no-op for ``key`` None)."""
        if key is None:
            return
        phase = self._phases[key]
        phase.samples[threads] += 1
        old = phase.estimates[threads]
        # faster: taken at once (a count that became fast again wins now; if it was luck, the next forwards,
        # which run it, correct it); slower: smoothed (one descheduled forward does not discard a count)
        phase.estimates[threads] = seconds if seconds <= old else old + _ALPHA * (seconds - old)
        phase.last_tried[threads] = phase.calls

    @staticmethod
    def clock() -> float:
        """The clock :meth:`record`'s seconds come from (``time.perf_counter``)."""
        return time.perf_counter()
