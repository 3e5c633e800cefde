"""``POST /v1/completions`` (vLLM's ``OpenAIServingCompletion``): prompt(s) in, ``n`` completions each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..generation.engine import truncate_prompt_tokens
from ..sampling.params import MAX_N
from . import limits as lim
from . import protocol as p
from .response_builder import CompletionResponseBuilder
from .serving_engine import Disconnected, OpenAIServing, check_context_length, check_token_ids, sampling_defaults
from .structured import compile_spec, requested_spec

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


class OpenAIServingCompletion(OpenAIServing):
    """OpenAI's (legacy) completions API with vLLM's extra sampling fields."""

    endpoint = "/v1/completions"

    @p.returns_errors
    async def create_completion(self, request: p.CompletionRequest, disconnected: Disconnected | None = None,
                                ) -> p.CompletionResponse | AsyncIterator[str]:
        """``n`` completions of each prompt of ``request`` (text, texts, token ids or lists of them), as one
        response or (``stream``) server-sent events, or the APIError (see :class:`OpenAIServing`)."""
        arrival = time.monotonic()
        target = self.target_for(request)
        gen = target.generator
        request.check_common()
        if request.suffix:  # "" (or null) asks for nothing after the completion
            raise p.invalid("suffix is not supported: GPT-2 only continues text", "suffix")
        spec, spec_field = requested_spec(request, self.limits)
        if spec is not None:
            await compile_spec(spec, spec_field, gen.tokenizer, self.limits)
        params = self.check_params(request.sampling_params(request.max_tokens, request.logprobs,
                                                           resolve=sampling_defaults(gen, DEFAULT_MAX_TOKENS),
                                                           structured=spec, structured_field=spec_field))
        max_tokens = params.max_new_tokens
        best_of = _check_best_of(request, params)
        if best_of is not None:  # generate best_of, keep the n best: ranked by their token logprobs
            params = params.with_(n=best_of, logprobs=params.logprobs or 0)
        check_token_ids(params.stop_token_ids, gen.config.vocab_size, "stop_token_ids")
        # before tokenizing any of them; best_of candidates count as n
        self.check_capacity(target, _count_prompts(request.prompt), params, "n" if best_of is None else "best_of")
        # a prompt cut to its last k tokens may be longer than the context: then only the body limit bounds it
        max_chars = target.max_prompt_chars if params.truncate_prompt_tokens is None else None
        prompts, texts = await run_in_threadpool(_encode_prompts, gen, request.prompt, max_chars)
        if params.truncate_prompt_tokens is not None:  # vLLM: the prompt is its last k tokens, echo included
            cut = [truncate_prompt_tokens(ids, params, gen.config.n_positions) for ids in prompts]
            texts = [t if len(c) == len(ids) else gen.tokenizer.decode(c) for t, c, ids in zip(texts, cut, prompts)]
            prompts = cut
        for ids in prompts:
            check_context_length(len(ids), max_tokens, gen.config.n_positions)
        echo = bool(request.echo)
        rid = p.new_id("cmpl", request.request_id)
        handle = await self.start(target, prompts, params, rid)
        prompt_lp = None
        if echo and request.logprobs is not None:  # prompt logprobs: scored on the model thread between steps
            top = request.logprobs
            try:
                prompt_lp = [await target.scheduler.call(
                    lambda g, ids=ids: g.score(ids, top_n=top, adapter=target.adapter)) for ids in prompts]
            except BaseException:
                handle.abort()
                raise
        builder = CompletionResponseBuilder(gen, rid, target.name, params.n, texts if echo else None, prompt_lp,
                                            prompts, token_ids=bool(request.return_tokens_as_token_ids))
        result = await self.respond(target, handle, arrival, builder, request.stream, request.stream_options,
                                    disconnected, spec_field or None)
        if best_of is None:
            return result
        skip = [len(ids) if echo and request.logprobs is not None else 0 for ids in prompts]
        return _keep_best(result, request.n or 1, best_of, skip, keep_logprobs=request.logprobs is not None)


def _check_best_of(request: p.CompletionRequest, params: Any) -> int | None:
    """``best_of`` when it asks for more candidates than ``n`` (None otherwise); 400 naming it when it is
    fewer than ``n``, or with ``stream`` or beam search (OpenAI: the best cannot be streamed)."""
    best_of = request.best_of
    if best_of is None or best_of == params.n:
        return None
    if best_of < params.n:
        raise p.invalid(f"best_of ({best_of}) must be at least n ({params.n})", "best_of")
    if best_of > MAX_N:  # the candidates are n of one request: n's range (a ValueError, a 500, otherwise)
        raise p.invalid(f"best_of must be an integer in [n, {MAX_N}], got {best_of}", "best_of")
    if request.stream:
        raise p.invalid("best_of greater than n cannot be streamed: the best are known at the end (as OpenAI)",
                        "best_of")
    if params.num_beams > 1:
        raise p.invalid("best_of cannot be combined with use_beam_search (the beams are ranked already)", "best_of")
    return best_of


def _keep_best(response: p.CompletionResponse, n: int, best_of: int, skip: list[int], *,
               keep_logprobs: bool) -> p.CompletionResponse:
    """The ``n`` of each prompt's ``best_of`` choices with the highest mean token logprob (OpenAI's
    ``best_of``: "the highest log probability per token"), best first, re-indexed; ``skip[j]``: prompt j's
    echoed logprob entries, left out of its score. ``usage`` still counts every token generated."""
    def score(choice: p.CompletionChoice, j: int) -> float:
        values = [v for v in choice.logprobs.token_logprobs[skip[j]:] if v is not None] if choice.logprobs else []
        return sum(values) / len(values) if values else float("-inf")

    kept = []
    for j in range(len(response.choices) // best_of):
        group = response.choices[j * best_of:(j + 1) * best_of]
        ranked = sorted(group, key=lambda c: -score(c, j))[:n]  # stable: ties keep their order
        for k, choice in enumerate(ranked):
            kept.append(choice.model_copy(update={"index": j * n + k,
                                                  "logprobs": choice.logprobs if keep_logprobs else None}))
    return response.model_copy(update={"choices": kept})


def _count_prompts(prompt: str | list | None) -> int:
    return 1 if prompt is None or isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else len(prompt)


def _encode_prompts(gen: Any, prompt: str | list | None, max_chars: int | None) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (a string, strings, token ids, or lists of token ids; None is "", a
    new document); a text longer than ``max_chars`` is refused before it is tokenized. Runs on a worker thread."""
    if prompt is None:
        items: list = [""]
    elif isinstance(prompt, str):
        items = [prompt]
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
            check_token_ids(item, gen.config.vocab_size, "prompt")
            ids.append(list(item))
            texts.append(gen.tokenizer.decode(item))
    return ids, texts
