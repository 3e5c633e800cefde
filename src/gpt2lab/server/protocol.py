"""Request and response bodies of the OpenAI-compatible API (pydantic), and their mapping to SamplingParams.

The request models check *types* only (strict: ``"0.7"`` is not a number, ``true`` is not an integer);
ranges are checked by :class:`~gpt2lab.sampling.SamplingParams`, the one place that knows them, so the
API, the CLI and the library reject the same values with the same message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SamplingParams

# API name -> SamplingParams name, where they differ
_API_TO_PARAMS = {"max_tokens": "max_new_tokens"}
_PARAMS_TO_API = {v: k for k, v in _API_TO_PARAMS.items()}


class APIError(Exception):
    """An error answered with an OpenAI-shaped body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- requests ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # extra="forbid": a misspelt parameter ("temprature") is an error naming it, not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


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
    user: str | None = None
    # gpt2lab's own controls
    top_k: int | None = Field(None, description="Keep the k most likely tokens (0 = off).")
    min_p: float | None = Field(None, description="Drop tokens below min_p x the top probability (0 = off).")
    typical_p: float | None = Field(None, description="Locally typical sampling mass (1 = off).")
    repetition_penalty: float | None = Field(None, description="HF-style repetition penalty (1 = off).")
    no_repeat_ngram_size: int | None = Field(None, description="Never repeat an n-gram of this size (0 = off).")

    _SAMPLING = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "typical_p", "repetition_penalty", "no_repeat_ngram_size")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        resolve: Callable[[dict[str, Any]], SamplingParams] | None = None) -> SamplingParams:
        """The validated SamplingParams; a bad value raises :class:`APIError` 400 naming the field.

        ``resolve``: turns the fields the client sent (SamplingParams names) into SamplingParams with the
        server's defaults (:meth:`gpt2lab.generation.Generator.resolve_sampling`: the checkpoint's
        ``generation_config.json`` for fields not sent). ``max_tokens=None``: not sent."""
        kwargs: dict[str, Any] = {name: getattr(self, name) for name in self._SAMPLING
                                  if getattr(self, name) is not None}
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
        try:
            return resolve(kwargs) if resolve is not None else SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise params_error(exc) from None


def params_error(exc: Exception) -> APIError:
    """A SamplingParams validation error as a 400 whose ``param`` is the API field it names."""
    message = str(exc)
    head = message.split(" ", 1)[0].split("[", 1)[0]
    param = _PARAMS_TO_API.get(head, head) if head in SamplingParams.field_names() else None
    if param is not None and head in _PARAMS_TO_API:
        message = param + message[len(head):]
    return invalid(message, param)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (OpenAI's legacy completions API, plus gpt2lab's sampling controls)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    logprobs: int | None = Field(None, description="Return the chosen token's logprob and this many top "
                                                   "alternatives (0..20).")
    echo: bool | None = Field(False, description="Prepend the prompt (and, with logprobs, its token logprobs).")
    best_of: int | None = Field(None, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported (GPT-2 has no insertion mode).")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: messages rendered into GPT-2's dialogue layout."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens (newer OpenAI name).")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, description="Alternatives per token with logprobs=true (0..20).")


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


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2lab"
    max_model_len: int
    # the checkpoint's generation_config.json: the defaults of request fields a client does not send
    generation_config: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
