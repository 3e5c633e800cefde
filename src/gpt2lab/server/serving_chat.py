"""``POST /v1/chat/completions`` (vLLM's ``OpenAIServingChat``): messages rendered by the model's chat
template, as ``gpt2lab chat`` renders them, and ``n`` replies."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..generation.engine import truncate_prompt_tokens
from . import limits as lim
from . import protocol as p
from .response_builder import ChatCompletionResponseBuilder
from .serving_engine import Disconnected, OpenAIServing, check_token_ids, sampling_defaults
from .structured import compile_spec, requested_spec

if TYPE_CHECKING:
    from .serving_models import Target

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
        if request.top_logprobs is not None and not request.logprobs:
            raise p.invalid("top_logprobs needs logprobs=true", "top_logprobs")
        n_pos = gen.config.n_positions
        if request.max_completion_tokens is not None:  # the newer name wins over max_tokens (vLLM)
            max_tokens, param_name = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param_name = request.max_tokens, "max_tokens"
        if max_tokens is not None and isinstance(max_tokens, int) and max_tokens >= n_pos:
            raise p.invalid(f"{param_name} ({max_tokens}) leaves no room for the conversation in the model's "
                            f"context of {n_pos} tokens", param_name, "context_length_exceeded")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        spec, spec_field = requested_spec(request, self.limits)
        if spec is not None:
            await compile_spec(spec, spec_field, gen.tokenizer, self.limits)
        params = self.check_params(request.sampling_params(max_tokens, logprobs, param_name,
                                                           resolve=sampling_defaults(gen, DEFAULT_CHAT_MAX_TOKENS),
                                                           structured=spec, structured_field=spec_field))
        check_token_ids(params.stop_token_ids, gen.config.vocab_size, "stop_token_ids")
        _check_messages(request.messages, self.limits, target.max_prompt_chars, n_pos)
        chat = await self._render(target, request, n_pos - (max_tokens if max_tokens is not None else 1), arrival)
        prompt_ids = truncate_prompt_tokens(chat.token_ids, params, n_pos)
        if max_tokens is None:  # default: as much as fits, at most the checkpoint's or DEFAULT_CHAT_MAX_TOKENS
            params = params.with_(max_new_tokens=max(params.min_tokens,
                                                     min(params.max_new_tokens, n_pos - len(prompt_ids))))
        if spec is None:  # a structured reply ends where its grammar does: a template's stop could cut it open
            params = params.with_(stop=[*params.stop, *chat.stop])
        rid = p.new_id("chatcmpl", request.request_id)
        handle = await self.start(target, [prompt_ids], params, rid)
        last = request.messages[-1]
        echoed = last.text() if request.echo and last.role == "assistant" else ""  # vLLM's chat echo
        builder = ChatCompletionResponseBuilder(gen, rid, target.name, params.n, len(prompt_ids),
                                                logprobs, echo=echoed, continuing=bool(request.continue_final_message),
                                                token_ids=bool(request.return_tokens_as_token_ids))
        return await self.respond(target, handle, arrival, builder, request.stream, request.stream_options,
                                  disconnected, spec_field or None)

    async def _render(self, target: Target, request: p.ChatCompletionRequest, max_prompt_tokens: int,
                      arrival: float) -> Any:
        """The conversation as ``target``'s chat template lays it out (its base model's render pool renders
        it), as ``gpt2lab chat`` renders it (oldest turns dropped to fit ``max_prompt_tokens``, system
        messages kept): a ChatPrompt. The template is code from the checkpoint, so it runs in a render
        process (never on the event loop or the engine thread) within what is left of the request's time:
        400 naming ``messages`` when the template refuses them or they do not fit, 500
        ``chat_template_error`` naming the template when it is broken or crosses its bounds, 408 when the
        render runs past the request timeout (it is stopped)."""
        from ..generation.chat_worker import RenderFailed, RenderJob

        # developer = system (OpenAI's newer name); a tool (or function) result is a line on the user's side
        plain = [{"role": _LAYOUT_ROLE.get(m.role, m.role),
                  "content": f"Tool result: {m.text()}" if m.role in ("tool", "function") else m.text()}
                 for m in request.messages]
        job = RenderJob(plain, max_prompt_tokens,
                        add_generation_prompt=request.add_generation_prompt is not False
                        and not request.continue_final_message,
                        continue_final_message=bool(request.continue_final_message))
        remaining = self.request_timeout - (time.monotonic() - arrival)
        try:
            return await target.chat_renderer.render_async(job, remaining)
        except RenderFailed as exc:
            message = str(exc)
            if exc.kind == "messages":
                raise p.invalid(message, "messages", "context_length_exceeded" if "fit" in message else None) \
                    from None
            if exc.kind == "timeout":
                target.scheduler.metrics.aborted("timeout").inc()
                raise p.APIError(408, f"the request ran longer than the server's request timeout "
                                 f"({self.request_timeout:g} s) while its conversation was rendered: {message}",
                                 type="timeout_error", code="request_timeout") from None
            raise p.APIError(500, f"the model's chat template failed, not the request: {message}",
                             type="server_error", code="chat_template_error" if exc.kind == "template"
                             else "chat_render_failed") from None


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


_LAYOUT_ROLE = {"developer": "system", "tool": "user", "function": "user"}
