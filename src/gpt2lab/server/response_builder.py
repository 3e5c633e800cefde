"""Response building: engine outputs (``RequestOutput`` per step) -> OpenAI response objects and stream chunks.

A builder collects one request's choices (choice index = prompt * n + sample): ``add`` each step's
outputs then ``response()`` for a whole body, or ``first_chunks()``, ``chunks(outputs)`` and
``usage_chunk()`` for server-sent events (:func:`sse_event`, ending with :data:`SSE_DONE`). The layouts
are OpenAI's (choices, ``logprobs``, ``usage``) plus vLLM's ``prompt_logprobs``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import protocol as p

SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream (OpenAI's)


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON (non-ASCII text as is, as OpenAI sends it)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ResponseBuilder:
    """Accumulates engine outputs into choices (index = prompt * n + sample), for a whole response
    (``add`` then ``response``) or as stream chunks (``first_chunks``, ``chunks``, ``usage_chunk``).

    ``gen``: the Generator (its tokenizer names tokens); ``rid``: the response id; ``name``: the served
    model name; ``count``: choices; ``prompt_tokens``: the prompt tokens of the whole request (usage);
    ``token_ids``: logprob tokens shown as ``token_id:N``."""

    chunk_object = ""

    def __init__(self, gen: Any, rid: str, name: str, count: int, prompt_tokens: int, token_ids: bool = False) -> None:
        self.tok, self.rid, self.name, self.prompt_tokens = gen.tokenizer, rid, name, prompt_tokens
        self.token_ids = token_ids
        self.text = [""] * count
        self.reason: list[str | None] = [None] * count
        self.generated = [0] * count
        self.prompt_logprobs: list[p.PromptLogprobs | None] = [None] * count  # vLLM's prompt_logprobs

    def _index(self, out: Any) -> int:
        return out.index

    def _name(self, token_id: int, token: str) -> str:
        """A token as logprobs show it: its text, or ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``)."""
        return f"token_id:{token_id}" if self.token_ids else token

    def add(self, outs: list[Any]) -> None:
        """Take one step's outputs (``RequestOutput`` list) into the whole response."""
        raise NotImplementedError

    def response(self) -> Any:
        """The whole response object, once every sequence finished."""
        raise NotImplementedError

    def first_chunks(self) -> list[dict[str, Any]]:
        """The stream's opening chunks, sent before any token (the echoed prompts; chat's role)."""
        raise NotImplementedError

    def chunks(self, outs: list[Any]) -> list[dict[str, Any]]:
        """One step's outputs as stream chunks (one per choice that has something new)."""
        raise NotImplementedError

    def usage(self) -> p.Usage:
        """Token counts so far: the prompts', the completions' and their sum."""
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
        """The stream's last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {"id": self.rid, "object": self.chunk_object, "created": int(time.time()), "model": self.name,
                "choices": [], "usage": self.usage().model_dump()}


class CompletionResponseBuilder(ResponseBuilder):
    """``/v1/completions``: ``n`` choices per prompt of ``prompts`` (token ids). ``echo_texts``: each prompt's
    text, put before its completions (``echo``); ``prompt_lp``: each prompt's scored tokens
    (:meth:`~gpt2lab.generation.Generator.score`), their logprobs then lead the choice's (``echo`` with
    ``logprobs``)."""

    chunk_object = "text_completion"

    def __init__(self, gen: Any, rid: str, name: str, n: int, echo_texts: list[str] | None,
                 prompt_lp: list[list] | None, prompts: list[list[int]], *, token_ids: bool = False) -> None:
        super().__init__(gen, rid, name, len(prompts) * n, sum(map(len, prompts)), token_ids)
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
        lp = p.CompletionLogprobs(tokens=[self._name(ids[0], first)], token_logprobs=[None], top_logprobs=[None],
                                  text_offset=[0])
        self._extend(lp, scored, len(first))
        return lp

    def _extend(self, lp: p.CompletionLogprobs, entries: list[Any], offset: int) -> int:
        for entry in entries:
            lp.tokens.append(self._name(entry.token_id, entry.token))
            lp.token_logprobs.append(entry.logprob)
            top = {self._name(i, t): v for i, t, v in entry.top}
            # the chosen token always (up to k + 1 entries, as OpenAI)
            top.setdefault(self._name(entry.token_id, entry.token), entry.logprob)
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


class ChatCompletionResponseBuilder(ResponseBuilder):
    """``/v1/chat/completions``: ``n`` replies to one rendered conversation of ``prompt_tokens`` tokens;
    ``top_logprobs``: alternatives per token when logprobs were asked for (``None``: no logprobs).

    A reply's content is the generated text without the whitespace around it (GPT-2 writes a space
    after ``Bot:``; a reply may end in a space or a newline before the next turn). The same content is
    streamed (:class:`ReplyText`), and the logprob entries' ``token`` texts join to it, so a client that
    assembles the stream, or the tokens, gets exactly the non-streamed ``content``."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, gen: Any, rid: str, name: str, n: int, prompt_tokens: int, top_logprobs: int | None = None,
                 *, echo: str = "", token_ids: bool = False, continuing: bool = False) -> None:
        super().__init__(gen, rid, name, n, prompt_tokens, token_ids)
        self.top_n, self.echo = top_logprobs, echo
        # continuing the last message (continue_final_message): its leading whitespace is the reply's own
        self.replies = [ReplyText(trim_start=not continuing) for _ in range(n)]
        self.text = [echo] * n  # vLLM's chat echo: the reply starts with the last message's content
        self.logprobs: list[list[p.ChatTokenLogprob] | None] = [None] * n

    def _entry(self, e: Any, piece: str | None) -> p.ChatTokenLogprob:
        """One token's entry: ``piece`` is the part of its text inside the content (None: all of it). The
        top alternatives are exactly the ``top_logprobs`` most likely tokens, as OpenAI and vLLM give them
        for chat (the chosen token is not added: that is the legacy completions API's rule)."""
        raw = self.tok.token_bytes
        top = [p.TopLogprob(token=self._name(i, t), logprob=v, bytes=list(raw(i)))
               for i, t, v in e.top[:self.top_n or 0]]
        token, data = (e.token, raw(e.token_id)) if piece is None else (piece, piece.encode("utf-8"))
        return p.ChatTokenLogprob(token=self._name(e.token_id, token), logprob=e.logprob, bytes=list(data),
                                  top_logprobs=top)

    def _step(self, out: Any) -> tuple[str, list[p.ChatTokenLogprob] | None]:
        """This step's content delta and the logprob entries now complete."""
        self._keep_prompt_logprobs(0, out)  # the conversation's: the same for every choice
        i = out.index
        self.generated[i] += len(out.token_ids)
        self.reason[i] = out.finish_reason
        delta, entries = self.replies[i].push(out.text, out.logprobs, out.finished)
        self.text[i] += delta
        if out.logprobs is None:
            return delta, None
        return delta, [self._entry(e, piece) for e, piece in entries]

    def _chunk(self, choice: p.ChatChunkChoice) -> dict[str, Any]:
        chunk = p.ChatCompletionChunk(id=self.rid, model=self.name, choices=[choice]).model_dump()
        chunk["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)  # OpenAI omits unset keys
        return chunk

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk(p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content=self.echo)))
                for i in range(len(self.text))]

    def chunks(self, outs: list[Any]) -> list[dict[str, Any]]:
        chunks = []
        for out in outs:
            text, lp = self._step(out)
            if text or out.finished or lp:
                chunks.append(self._chunk(p.ChatChunkChoice(
                    index=out.index, delta=p.ChatDelta(content=text or None), finish_reason=out.finish_reason,
                    logprobs=p.ChatLogprobs(content=lp) if lp is not None else None)))
        return chunks

    def add(self, outs: list[Any]) -> None:
        for out in outs:
            _, lp = self._step(out)
            if lp is not None:
                self.logprobs[out.index] = (self.logprobs[out.index] or []) + lp

    def response(self) -> p.ChatCompletionResponse:
        choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=t),
                                logprobs=p.ChatLogprobs(content=lp) if lp is not None else None, finish_reason=r)
                   for i, (t, lp, r) in enumerate(zip(self.text, self.logprobs, self.reason))]
        return p.ChatCompletionResponse(id=self.rid, model=self.name, choices=choices, usage=self.usage(),
                                        prompt_logprobs=self.prompt_logprobs[0])


class ReplyText:
    """One chat reply's content as the engine's text arrives: the generated text without leading and
    trailing whitespace, given out in order (trailing whitespace is held back until text follows it,
    and dropped at the end), with each token's logprob entry once its text is given out.
    ``trim_start=False``: the leading whitespace is kept (a continued message's own).

    ``push(text, logprobs, finished)`` -> (content delta, [(entry, piece)]): every token keeps its entry;
    ``piece`` is the part of the token's text inside the content when that is not all of it (the reply's
    first token, ``" Hello"`` -> ``"Hello"``; the last one before trimmed whitespace or a stop-string
    cut; ``""`` for whitespace around the reply or ``<|endoftext|>`` left out of the text), else None. So
    the deltas join to the content, and so do the entries' texts (pieces, or whole tokens). Entries
    without a ``text_span`` (None) are given out as they come, whole."""

    def __init__(self, trim_start: bool = True) -> None:
        self.raw = ""  # the engine's text so far
        # where the content starts (the first character that is not a space; 0 when not trimmed)
        self.start: int | None = None if trim_start else 0
        self.sent = 0  # the raw text up to here is given out
        self.held: list[Any] = []  # logprob entries whose text is not all given out yet

    def push(self, text: str, logprobs: list[Any] | None,
             finished: bool) -> tuple[str, list[tuple[Any, str | None]]]:
        self.raw += text
        delta = ""
        if text.strip():  # trailing whitespace waits: given out only once text follows it
            if self.start is None:
                self.start = len(self.raw) - len(self.raw.lstrip())
            end = len(self.raw) - (len(text) - len(text.rstrip()))
            delta, self.sent = self.raw[max(self.sent, self.start):end], end
        self.held.extend(logprobs or ())
        return delta, self._entries(finished)

    def _entries(self, finished: bool) -> list[tuple[Any, str | None]]:
        out: list[tuple[Any, str | None]] = []
        while self.held:
            e = self.held[0]
            if e.text_span is None:  # no span known (not from the engine's text): the token as it is
                out.append((self.held.pop(0), None))
                continue
            a, b = e.text_span
            if not finished and (self.start is None or b > self.sent):
                break  # its text is not all given out yet (held back, or the reply has not begun)
            self.held.pop(0)
            if finished and not self.held:
                b = max(b, len(self.raw))  # a character completed only at the very end: the last token's
            lo = max(a, self.start if self.start is not None else b)
            hi = max(min(b, self.sent), lo)
            whole = (lo, hi) == (a, b) and self.raw[a:b] == e.token
            out.append((e, None if whole else self.raw[lo:hi]))
        return out
