"""``POST /v1/chat/completions`` (vLLM's ``OpenAIServingChat``): messages rendered by the model's chat
template, as ``gpt2lab chat`` renders them, and ``n`` replies."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..generation.engine import truncate_prompt_tokens
from . import limits as lim
from . import protocol as p
from .response_builder import ChatCompletionResponseBuilder
from .serving_engine import Disconnected, OpenAIServing, check_token_ids, sampling_defaults

DEFAULT_CHAT_MAX_TOKENS = 256  # chat replies: capped so a GPT-2 that never stops does not fill the context


class OpenAIServingChat(OpenAIServing):
    """OpenAI's chat completions API with vLLM's extra sampling fields."""

    endpoint = "/v1/chat/completions"

    @p.returns_errors
    async def create_chat_completion(self, request: p.ChatCompletionRequest,
                                     disconnected: Disconnected | None = None,
                                     ) -> p.ChatCompletionResponse | AsyncIterator[str]:
        """``n`` replies to the conversation ``request.messages`` (rendered by the model's chat template, the
        oldest turns dropped to fit), as one response or (``stream``) server-sent events, or the APIError
        (see :class:`OpenAIServing`)."""
        arrival = time.monotonic()
        target = self.target_for(request)
        gen = target.generator
        request.check_common()
        request.check_openai_fields()
        if request.max_tokens is not None and request.max_completion_tokens is not None:
            raise p.invalid("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if request.top_logprobs is not None and not request.logprobs:
            raise p.invalid("top_logprobs needs logprobs=true", "top_logprobs")
        n_pos = gen.config.n_positions
        if request.max_completion_tokens is not None:
            max_tokens, param_name = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param_name = request.max_tokens, "max_tokens"
        if max_tokens is not None and isinstance(max_tokens, int) and max_tokens >= n_pos:
            raise p.invalid(f"{param_name} ({max_tokens}) leaves no room for the conversation in the model's "
                            f"context of {n_pos} tokens", param_name, "context_length_exceeded")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.check_params(request.sampling_params(max_tokens, logprobs, param_name,
                                                           resolve=sampling_defaults(gen, DEFAULT_CHAT_MAX_TOKENS)))
        check_token_ids(params.stop_token_ids, gen.config.vocab_size, "stop_token_ids")
        _check_messages(request.messages, self.limits, target.max_prompt_chars, n_pos)
        chat, style = await run_in_threadpool(_render_chat, gen, request.messages,
                                              n_pos - (max_tokens if max_tokens is not None else 1))
        prompt_ids = truncate_prompt_tokens(chat.token_ids, params, n_pos)
        if max_tokens is None:  # default: as much as fits, at most the checkpoint's or DEFAULT_CHAT_MAX_TOKENS
            params = params.with_(max_new_tokens=max(params.min_tokens,
                                                     min(params.max_new_tokens, n_pos - len(prompt_ids))))
        params = params.with_(stop=[*params.stop, *chat.stop])
        rid = p.new_id("chatcmpl")
        handle = await self.start(target, [prompt_ids], params, rid)
        builder = ChatCompletionResponseBuilder(gen, rid, target.name, params.n, len(prompt_ids), style, logprobs)
        return await self.respond(target, handle, arrival, builder, request.stream, request.stream_options,
                                  disconnected)


def _check_messages(messages: list[p.ChatMessage], limits: lim.Limits, max_chars: int, n_positions: int) -> None:
    """Bounds on a conversation, checked before it is rendered and tokenized."""
    if len(messages) > limits.max_messages:
        raise p.invalid(f"messages: at most {limits.max_messages} messages per request (this server's limit), "
                        f"got {len(messages)}", "messages", "limit_exceeded")
    total = 0
    for i, message in enumerate(messages):
        text = message.text()
        lim.check_text(text, max_chars, f"messages[{i}].content", n_positions)
        total += len(text)
    if total > limits.chat_context_factor * max_chars:
        raise p.invalid(f"messages hold {total} characters in all, more than this server's limit of "
                        f"{limits.chat_context_factor * max_chars} ({limits.chat_context_factor} contexts' worth)",
                        "messages", "limit_exceeded")


_LAYOUT_ROLE = {"developer": "system", "tool": "user"}


def _render_chat(gen: Any, messages: list[p.ChatMessage], max_prompt_tokens: int) -> tuple[Any, Any]:
    """The conversation as a prompt rendered by the model's chat template, as ``gpt2lab chat`` renders it
    (oldest turns dropped to fit ``max_prompt_tokens``, system messages kept), and that layout's style."""
    from ..generation import chat_format

    try:
        # developer = system (OpenAI's newer name); a tool result is a line on the user's side
        plain = [{"role": _LAYOUT_ROLE.get(m.role, m.role),
                  "content": f"Tool result: {m.text()}" if m.role == "tool" else m.text()} for m in messages]
        chat_format.from_messages(plain)  # checks roles and contents
        if all(m["role"] == "system" for m in plain):
            raise p.invalid("messages needs at least one user or assistant message", "messages")
        style = chat_format.style_for_model(gen.name, gen.path)
        return chat_format.build_prompt_messages(plain, gen.tokenizer, style, max_prompt_tokens), style
    except ValueError as exc:
        raise p.invalid(str(exc), "messages", "context_length_exceeded" if "fit" in str(exc) else None) from None
