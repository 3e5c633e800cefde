"""Request and response bodies of the OpenAI-compatible API (pydantic), and their mapping to SamplingParams.

The request models check *types* only (strict: ``"0.7"`` is not a number, ``true`` is not an integer);
ranges are checked by :class:`~gpt2lab.sampling.SamplingParams`, the one place that knows them, so the
API, the CLI and the library reject the same values with the same message.

Field names follow OpenAI's API (``openai-python``'s ``CompletionCreateParams`` and
``CompletionCreateParams`` for chat) plus vLLM's extra sampling parameters (vLLM's
``CompletionRequest`` / ``ChatCompletionRequest``), with their meanings. OpenAI fields that cannot
change what a GPT-2 writes (``metadata``, ``store``, ``service_tier``, ...) are accepted and ignored;
fields that would change it and cannot be honoured (tools, audio) are a 400 naming them;
any other name is a 400 too, so a misspelt parameter never passes silently.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..http_guard import error_body, printable  # noqa: F401  (error_body: re-exported, the one error body)
from ..sampling import SamplingParams, StructuredOutputsParams

# SamplingParams name -> API field, where they differ (chat renames more: see ChatCompletionRequest)
_PARAMS_TO_API = {"max_new_tokens": "max_tokens", "num_beams": "n"}
MAX_LIST_ITEMS = 256  # stop_token_ids, bad_words: client-controlled sizes stay bounded
T = TypeVar("T")


class APIError(Exception):
    """An error answered with an OpenAI-shaped body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def unicode_problem(value: Any) -> str | None:
    """Where ``value`` (a str, or lists / dicts of them) holds a character that is not valid Unicode
    text (a lone surrogate, which JSON's ``\\ud800`` escapes can carry), or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = unicode_problem(key) or unicode_problem(item)
            if where:
                return f"{where} (in key {printable(repr(key))})"
        return None
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
        for i, item in enumerate(value):
            where = unicode_problem(item)
            if where:
                return f"{where} of item {i}"
    return None


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error`` naming ``param`` (the request field at fault)."""
    return APIError(400, message, param=param, code=code)


def returns_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T | APIError]]:
    """A serving method that answers a client's mistake with the :class:`APIError` it raised, returned as
    its result (vLLM's serving methods return an ``ErrorResponse`` likewise): the HTTP layer sends it as
    is, and a test calls the method without a server."""

    @functools.wraps(method)
    async def answer(*args: Any, **kwargs: Any) -> T | APIError:
        try:
            return await method(*args, **kwargs)
        except APIError as exc:
            return exc

    return answer


# -- requests ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # extra="forbid": a misspelt parameter ("temprature") is an error naming it, not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        """Every text field of every request model holds valid Unicode (400 naming the field, not a
        500 from the tokenizer or the JSON encoder)."""
        where = unicode_problem(value)
        if where:
            raise ValueError(f"must be valid Unicode text; it holds {where}")
        return value


class StreamOptions(_Strict):
    include_usage: bool | None = False
    # OpenAI pads stream chunks against side channels; a local server's chunks carry nothing to hide
    include_obfuscation: bool | None = Field(None, description="Accepted and ignored.")
    continuous_usage_stats: bool | None = Field(None, description="vLLM's: the usage so far in every chunk "
                                                                  "(with include_usage).")


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="The served model's id (see /v1/models); optional.")
    max_tokens: int | None = Field(None, description="New tokens to generate at most.")
    temperature: float | None = Field(None, description="0 = greedy; default 1.0.")
    top_p: float | None = None
    n: int | None = Field(None, description="Completions per prompt.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="Same seed, same parameters, same prompt: same text, alone or "
                                               "batched with other requests.")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    user: str | None = Field(None, description="Accepted and ignored.")
    # vLLM's extra sampling parameters, with vLLM's meanings
    top_k: int | None = Field(None, description="Keep the k most likely tokens (0 or -1 = off).")
    min_p: float | None = Field(None, description="Drop tokens below min_p x the top probability (0 = off).")
    repetition_penalty: float | None = Field(None, description="HF-style repetition penalty (1 = off).")
    ignore_eos: bool | None = Field(None, description="Keep generating past <|endoftext|>.")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_LIST_ITEMS,
                                             description="Token ids that end the completion.")
    bad_words: list[str] | None = Field(None, max_length=MAX_LIST_ITEMS, description="Strings never generated.")
    min_tokens: int | None = Field(None, description="No EOS, stop token or stop string before this many tokens.")
    include_stop_str_in_output: bool | None = Field(None, description="Keep the stop string at the end.")
    skip_special_tokens: bool | None = Field(None, description="Leave <|endoftext|> out of the text (default).")
    use_beam_search: bool | None = Field(None, description="Beam search with n beams; returns all n.")
    length_penalty: float | None = Field(None, description="Beam search: exponent of the length in the score.")
    truncate_prompt_tokens: int | None = Field(None, description="Keep only the last k prompt tokens (-1: the "
                                                                 "model's context).")
    prompt_logprobs: int | None = Field(None, description="Each prompt token's logprob and top-k (0..20); "
                                                          "not with stream.")
    # vLLM's request options
    priority: int | None = Field(None, description="vLLM's scheduling priority: only 0 (first come, first served).")
    request_id: str | None = Field(None, max_length=128, description="vLLM's: the response id is made of it.")
    return_tokens_as_token_ids: bool | None = Field(None, description="Logprob tokens as 'token_id:N' (vLLM).")
    spaces_between_special_tokens: bool | None = Field(None, description="Accepted: GPT-2 has one special token, "
                                                                         "so it changes nothing.")
    add_special_tokens: bool | None = Field(None, description="Accepted: GPT-2's tokenizer adds no special "
                                                              "tokens, so it changes nothing.")
    # gpt2lab's own controls
    typical_p: float | None = Field(None, description="Locally typical sampling mass (1 = off).")
    no_repeat_ngram_size: int | None = Field(None, description="Never repeat an n-gram of this size (0 = off).")
    # structured outputs (server/structured.py): OpenAI's response_format, vLLM's structured_outputs, legacy guided_*
    response_format: dict[str, Any] | None = Field(None, description='{"type": "text"}, {"type": "json_object"} or '
                                                   '{"type": "json_schema", "json_schema": {"name", "schema", '
                                                   '"strict"}}: the output matches the schema.')
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM's: one of json, regex, choice, "
                                                      "grammar, json_object (+ whitespace_pattern, "
                                                      "disable_any_whitespace, disable_additional_properties, "
                                                      "disable_fallback).")
    guided_json: str | dict[str, Any] | None = Field(None, description="vLLM's legacy name: a JSON Schema.")
    guided_regex: str | None = Field(None, description="vLLM's legacy name: the output matches this regex.")
    guided_choice: list[str] | None = Field(None, max_length=MAX_LIST_ITEMS,
                                            description="vLLM's legacy name: the output is one of these.")
    guided_grammar: str | None = Field(None, description="vLLM's legacy name: a Lark or GBNF grammar.")
    guided_whitespace_pattern: str | None = Field(None, description="vLLM's legacy name: JSON whitespace regex.")
    guided_decoding_backend: str | None = Field(None, description="Accepted and ignored (llguidance).")

    _SAMPLING = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "typical_p", "repetition_penalty", "no_repeat_ngram_size", "ignore_eos", "stop_token_ids",
                 "bad_words", "min_tokens", "include_stop_str_in_output", "skip_special_tokens", "length_penalty",
                 "truncate_prompt_tokens", "prompt_logprobs")
    # SamplingParams name -> this request's field, for error messages
    _RENAMES: ClassVar[dict[str, str]] = {}

    def check_common(self) -> None:
        """Checks across fields that pydantic's per-field types cannot express (400 naming the field)."""
        if self.priority not in (None, 0):
            raise invalid("priority: requests are served first come, first served; only 0 is accepted (vLLM "
                          "without priority scheduling)", "priority")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise invalid("prompt_logprobs is not available with stream=true (as in vLLM)", "prompt_logprobs")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, max_tokens_field: str = "max_tokens",
                        resolve: Callable[[dict[str, Any]], SamplingParams] | None = None,
                        structured: StructuredOutputsParams | None = None,
                        structured_field: str = "structured_outputs") -> SamplingParams:
        """The validated SamplingParams; a bad value raises :class:`APIError` 400 naming the field.

        ``structured``: the request's structured output (:func:`.structured.requested_spec`, compiled off the
        event loop first), from the field ``structured_field``.

        ``resolve``: turns the fields the client sent (SamplingParams names) into SamplingParams with the
        server's defaults (:meth:`gpt2lab.generation.Generator.resolve_sampling`: the checkpoint's
        ``generation_config.json`` for fields not sent). ``max_tokens=None``: not sent.

        ``use_beam_search`` (vLLM): beam search of width ``n`` returning all ``n`` beams, best first
        (width 1 is greedy decoding); the sampling controls are then ignored."""
        kwargs: dict[str, Any] = {name: getattr(self, name) for name in self._SAMPLING
                                  if getattr(self, name) is not None}
        if self.use_beam_search:
            width = kwargs.get("n", 1)
            if width == 1:
                kwargs["temperature"] = 0.0  # a beam of one is greedy decoding
            else:
                kwargs["num_beams"] = width
        if self.stop is not None:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.logit_bias:
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    bias[int(key)] = value
                except ValueError:
                    raise invalid(f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                                  "logit_bias") from None
            kwargs["logit_bias"] = bias
        if max_tokens is not None:
            kwargs["max_new_tokens"] = max_tokens
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if structured is not None:
            kwargs["structured_outputs"] = structured
        try:
            return resolve(kwargs) if resolve is not None else SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise params_error(exc, {**self._RENAMES, "max_new_tokens": max_tokens_field,
                                     "structured_outputs": structured_field}) from None


def params_error(exc: Exception, renames: dict[str, str] | None = None) -> APIError:
    """A SamplingParams validation error as a 400 whose ``param`` is the API field it names
    (``renames``: SamplingParams name -> field, over the defaults of the completions API)."""
    table = {**_PARAMS_TO_API, **(renames or {})}
    message = str(exc)
    head = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":").split(".", 1)[0]  # structured_outputs.json: ...
    known = head in SamplingParams.field_names() or head == "prompt"  # the engine's admission checks name it
    param = table.get(head, head) if known else None
    if param is not None and head in table:
        message = param + message[len(head):]
    return invalid(message, param)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (OpenAI's legacy completions API, plus gpt2lab's sampling controls)."""

    prompt: str | list[str] | list[int] | list[list[int]] | None = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists; null "
                         "starts from <|endoftext|> (a new document), as \"\" does.")
    logprobs: int | None = Field(None, description="Return the chosen token's logprob and this many top "
                                                   "alternatives (0..20).")
    echo: bool | None = Field(False, description="Prepend the prompt (and, with logprobs, its token logprobs).")
    best_of: int | None = Field(None, description="Generate best_of completions per prompt and return the n with "
                                                  "the highest mean token logprob (not with stream).")
    suffix: str | None = Field(None, description="Not supported (GPT-2 has no insertion mode).")


class TextPart(_Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = Field(None, description="Accepted and ignored.")


class RefusalPart(_Strict):
    """An assistant message's refusal part (OpenAI): laid out as the assistant's text."""

    type: Literal["refusal"]
    refusal: str


class ChatMessage(_Strict):
    """One message. Besides role and content, the fields OpenAI's client sends back when a reply is
    reused as history (``ChatCompletionMessage.model_dump()``: ``refusal``, ``annotations``,
    ``audio``, ``function_call``, ``tool_calls``) and ``name`` / ``tool_call_id`` are accepted;
    they do not change the transcript a GPT-2 continues. A ``function`` message (OpenAI's older name of
    a tool result) is laid out as a tool message."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; an assistant message with no content shows its refusal, if any."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: messages rendered into GPT-2's dialogue layout."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens (newer OpenAI name).")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, description="Alternatives per token with logprobs=true (0..20).")
    # OpenAI fields that do not change a GPT-2's output: accepted and ignored
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored (nothing is stored).")
    store: bool | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_retention: str | None = Field(None, description="Accepted and ignored.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")
    modalities: list[str] | None = Field(None, description='Only ["text"].')
    tools: list[dict[str, Any]] | None = Field(None, description="Only an empty list: GPT-2 calls no tools.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Only "none" or "auto" (no tools).')
    functions: list[dict[str, Any]] | None = Field(None, description="OpenAI's older tools: only an empty list.")
    function_call: str | dict[str, Any] | None = Field(None, description='OpenAI\'s older tool_choice: only "none" '
                                                                         'or "auto".')
    audio: dict[str, Any] | None = Field(None, description="Only null: GPT-2 writes text.")
    prediction: dict[str, Any] | None = Field(None, description="Accepted and ignored (a predicted output only "
                                                                "speeds OpenAI's decoding up).")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    reasoning_effort: str | None = Field(None, description="Accepted and ignored (GPT-2 does not reason; as vLLM "
                                                           "for models without reasoning).")
    verbosity: str | None = Field(None, description="Accepted and ignored.")
    web_search_options: dict[str, Any] | None = Field(None, description="Only null: GPT-2 cannot search.")
    moderation: dict[str, Any] | None = Field(None, description="Only null: this server does not moderate.")
    # vLLM's chat options
    echo: bool | None = Field(None, description="vLLM's: the reply starts with the last message's content when "
                                                "that message is the assistant's.")
    add_generation_prompt: bool | None = Field(None, description="vLLM's: end the prompt with the assistant's cue "
                                                                 "(default true).")
    continue_final_message: bool | None = Field(None, description="vLLM's: continue the last (assistant) message "
                                                                  "instead of starting a new one.")
    chat_template: str | None = Field(None, description="Not accepted: a template is code (vLLM refuses it too "
                                                        "unless the server trusts request templates).")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Only {}: the server's templates take "
                                                                          "no extra variables.")

    _RENAMES: ClassVar[dict[str, str]] = {"logprobs": "top_logprobs"}

    def check_openai_fields(self) -> None:
        """The OpenAI fields that are accepted only in their no-op form: a 400 naming the field otherwise."""
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            raise invalid('modalities: only ["text"] is supported', "modalities")
        if self.tools:
            raise invalid("tools are not supported: a GPT-2 cannot call tools", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise invalid('tool_choice: only "none" or "auto" are supported (no tools)', "tool_choice")
        if self.functions:
            raise invalid("functions are not supported: a GPT-2 cannot call functions", "functions")
        if self.function_call not in (None, "none", "auto"):
            raise invalid('function_call: only "none" or "auto" are supported (no functions)', "function_call")
        for name in ("audio", "web_search_options", "moderation"):
            if getattr(self, name) is not None:
                raise invalid(f"{name} is not supported by this server (GPT-2 text only); leave it out or null",
                              name)
        if self.chat_template is not None:
            raise invalid("chat_template: a request cannot bring its own template (code run on the server); the "
                          "model's own template is used", "chat_template")
        if self.chat_template_kwargs:
            raise invalid("chat_template_kwargs: this server's chat templates take no extra variables",
                          "chat_template_kwargs")
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid("continue_final_message and add_generation_prompt cannot both be true (as in vLLM)",
                          "continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise invalid("continue_final_message needs the last message to be the assistant's",
                          "continue_final_message")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# -- responses -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one entry of ``prompt_logprobs`` (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extra (prompt_logprobs=k)


def _fingerprint() -> str:
    from .. import __version__

    return f"gpt2lab-{__version__}"


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str = Field(default_factory=_fingerprint)  # OpenAI's: the backend that answered


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None  # OpenAI's shape: always null here
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extra, over the rendered conversation
    system_fingerprint: str = Field(default_factory=_fingerprint)


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str = Field(default_factory=_fingerprint)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2lab"
    max_model_len: int
    quantization: str | None = Field(None, description="Weight quantization the model runs with: null (as stored), "
                                                       "int8, bf16 or int4 (vLLM's names).")
    # the checkpoint's generation_config.json: the defaults of request fields a client does not send
    generation_config: dict[str, Any] = Field(default_factory=dict)
    root: str | None = Field(None, description="Where the model comes from: its checkpoint, or an adapter's folder.")
    parent: str | None = Field(None, description="A LoRA adapter's base model (vLLM's field); null for a base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(_Strict):
    """``POST /v1/load_lora_adapter`` (vLLM's body)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model_name: str | None = Field(None, description="The base model to attach it to (default: the first).")


class UnloadLoRAAdapterRequest(_Strict):
    """``POST /v1/unload_lora_adapter`` (vLLM's body; ``lora_int_id`` is accepted and unused)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


def new_id(prefix: str, request_id: str | None = None) -> str:
    """A response id: ``prefix-`` and 32 random hex digits (``cmpl-...``, ``chatcmpl-...``, as OpenAI's), or
    ``prefix-request_id`` for a request that names itself (vLLM's ``request_id``)."""
    return f"{prefix}-{request_id if request_id is not None else uuid.uuid4().hex}"
