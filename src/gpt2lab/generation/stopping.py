"""Turning one sequence's tokens into text: UTF-8-safe deltas, cut at the first stop string.

Stop strings are matched on the decoded text, so they are found however the tokenizer splits them
(one token, several tokens, or the tail of one token plus the head of the next). Text that could
still turn out to be the start of a stop string is held back until it is known not to be, so a
streamed stop string never leaks even partly.

:class:`SequenceText` adds what ends a sequence besides stop strings (EOS and stop token ids, as
vLLM treats them) and keeps each token's logprob until the token's text is released, so logprobs
end where the text ends: a token that begins after a stop-string cut is never reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    from ..sampling import SamplingParams
    from .outputs import TokenLogprob


class StopTextStream:
    """Incremental detokenizer with stop-string handling for one sequence.

    ``push(token_id)`` returns ``(delta, stopped)``: the text that is now safe to emit and whether a
    stop string was completed (the stop string and anything after it are dropped, unless
    ``include_stop``: then the text ends with the stop string). ``flush()`` ends the stream and
    returns whatever was held back. ``text`` is everything emitted so far. With
    ``skip_special_tokens``, the tokenizer's special tokens (GPT-2: ``<|endoftext|>``) add no text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = False) -> None:
        self._detok = tokenizer.detokenizer()
        self._stop = list(stop)
        self._include_stop = include_stop
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._buffer = ""  # decoded text not yet emitted (a possible stop-string prefix)
        self.text = ""
        self.stopped = False
        self.decoded_total = 0  # characters decoded so far, a stop-string cut or not: tokens' text spans

    @property
    def decoded_len(self) -> int:
        """Characters decoded so far (emitted + held back): where the next token's text starts."""
        return len(self.text) + len(self._buffer)

    def push(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Add a token. ``check_stop=False`` (before ``min_tokens``) lets a completed stop string pass."""
        if self.stopped:
            return "", True
        if token_id not in self._skip:
            piece = self._detok.push(token_id)
            self._buffer += piece
            self.decoded_total += len(piece)
        return self._release(final=False, check=check_stop)

    def flush(self) -> str:
        """End of the sequence (length or EOS): release held-back text and any partial character."""
        if self.stopped:
            return ""
        rest = self._detok.flush()
        self._buffer += rest
        self.decoded_total += len(rest)
        return self._release(final=True, check=False)[0]

    def _release(self, final: bool, check: bool) -> tuple[str, bool]:
        if not self._stop:
            delta, self._buffer = self._buffer, ""
            self.text += delta
            return delta, False
        if check:
            # A stop string can only start in the buffer: everything emitted before was checked to
            # contain none and to end with no stop-string prefix longer than what stayed buffered.
            # The earliest match wins; at the same position, the first in the list.
            hits = [(i, s) for s in self._stop if (i := self._buffer.find(s)) >= 0]
            if hits:
                cut, stop = min(hits, key=lambda hit: hit[0])
                delta = self._buffer[:cut + (len(stop) if self._include_stop else 0)]
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


class SequenceText:
    """One sequence's text, finish reason and logprobs as tokens arrive, with vLLM's meanings.

    A token in ``params.stop_token_ids``, or EOS unless ``ignore_eos``, ends the sequence; its text
    is left out unless ``include_stop_str_in_output`` (and for a special token like EOS also
    ``skip_special_tokens=False``). Stop strings count from the ``min_tokens``-th token on (EOS and
    stop tokens are kept from being sampled before that by the logits pipeline).

    ``push(token_id, logprob)`` returns ``(text delta, logprobs now released, finish reason or
    None)``; ``finish()`` ends a sequence that ran out of budget and returns the rest. A token's
    logprob is released once its text starts inside the released text, so when a stop string cuts
    the text, the tokens after the cut are dropped with it (a token that spans the cut is kept).
    Each logprob gets its token's ``text_span`` in the text.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_token_id: int | None) -> None:
        self.stream = StopTextStream(tokenizer, params.stop, include_stop=params.include_stop_str_in_output,
                                     skip_special_tokens=params.skip_special_tokens)
        self._ends = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self._ends.add(eos_token_id)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._count = 0
        self._pending: list[tuple[int, TokenLogprob]] = []  # (text offset where the token starts, logprob)

    @property
    def text(self) -> str:
        return self.stream.text

    def push(self, token_id: int, logprob: TokenLogprob | None = None) -> tuple[str, list[TokenLogprob], str | None]:
        self._count += 1
        start = self.stream.decoded_total
        if logprob is not None:
            self._pending.append((self.stream.decoded_len, logprob))
        if token_id in self._ends:
            text = self.stream.push(token_id, check_stop=False)[0] if self._include_stop else ""
            self._span(logprob, start)
            return text + self.stream.flush(), self._release(everything=True), "stop"
        text, stopped = self.stream.push(token_id, check_stop=self._count >= self._min_tokens)
        self._span(logprob, start)
        return text, self._release(everything=False), "stop" if stopped else None

    def _span(self, logprob: TokenLogprob | None, start: int) -> None:
        if logprob is not None:
            logprob.text_span = (start, self.stream.decoded_total)

    def finish(self) -> tuple[str, list[TokenLogprob]]:
        """The sequence ends without a stop (length): the held-back text and logprobs."""
        return self.stream.flush(), self._release(everything=True)

    def _release(self, everything: bool) -> list[TokenLogprob]:
        if everything:
            out, self._pending = [lp for _, lp in self._pending], []
            return out
        end = len(self.stream.text)
        out = [lp for start, lp in self._pending if start < end]
        # after a stop-string cut nothing more is released: what started past the cut is dropped
        self._pending = [] if self.stream.stopped else [(s, lp) for s, lp in self._pending if s >= end]
        return out
