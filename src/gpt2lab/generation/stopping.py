"""Turning one sequence's tokens into text: UTF-8-safe deltas, cut at the first stop string.

Stop strings are matched on the decoded text, so they are found however the tokenizer splits them
(one token, several tokens, or the tail of one token plus the head of the next). Text that could
still turn out to be the start of a stop string is held back until it is known not to be, so a
streamed stop string never leaks even partly.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer


class StopTextStream:
    """Incremental detokenizer with stop-string handling for one sequence.

    ``push(token_id)`` returns ``(delta, stopped)``: the text that is now safe to emit and whether a
    stop string was completed (the stop string and anything after it are dropped). ``flush()`` ends
    the stream and returns whatever was held back. ``text`` is everything emitted so far.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._detok = tokenizer.detokenizer()
        self._stop = list(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._buffer = ""  # decoded text not yet emitted (a possible stop-string prefix)
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._buffer += self._detok.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """End of the sequence (length or EOS): release held-back text and any partial character."""
        if self.stopped:
            return ""
        self._buffer += self._detok.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        if not self._stop:
            delta, self._buffer = self._buffer, ""
            self.text += delta
            return delta, False
        # A stop string can only start in the buffer: everything emitted before was checked to
        # contain none and to end with no stop-string prefix longer than what stayed buffered.
        cut = min((i for i in (self._buffer.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            delta = self._buffer[:cut]
            self._buffer = ""
            self.text += delta
            self.stopped = True
            return delta, True
        keep = 0 if final else self._held_back()
        delta = self._buffer[:len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep:]
        self.text += delta
        return delta, False

    def _held_back(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        buf = self._buffer
        for k in range(min(len(buf), self._max_stop - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
