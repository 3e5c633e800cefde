"""``SamplingParams``: every generation control, validated in one place.

The library, the CLI and the server all build one of these, so a parameter means the same thing
everywhere and a bad value fails the same way: ``ValueError`` naming the parameter and its range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .structured import StructuredOutputsParams

MAX_N = 128  # completions per prompt at most (n; the server's best_of too)


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _token_map(value: Any) -> dict[int, Any]:
    """``logit_bias`` with integer keys; JSON objects give them as strings like ``"50256"``."""
    _check(isinstance(value, dict), "logit_bias", "a map of token ids to biases", value)
    out = {}
    for key, bias in value.items():
        try:
            token = int(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else None
        except ValueError:
            token = None
        _check(token is not None, "logit_bias", "a map of integer token ids to biases", key)
        out[token] = bias
    return out


@dataclass
class SamplingParams:
    """How to turn a prompt into a completion.

    Length: give ``max_new_tokens`` (new tokens only) or ``max_length`` (prompt + new tokens, as in
    ``transformers`` and the seed's ``generate_text``), not both; neither means 16 new tokens.

    Transforms run in this order on each step's logits: min_tokens, logit_bias / banned tokens,
    repetition_penalty, presence/frequency penalties, no_repeat_ngram, temperature, top_k, top_p,
    min_p, typical_p. ``temperature=0`` is greedy decoding (argmax; the filters are then moot).
    ``structured_outputs`` (:class:`~.structured.StructuredOutputsParams`, or a dict of its fields) masks
    what its grammar forbids after the other processors (bias, bans, penalties, n-grams) and before
    temperature and the filters, so that top-k and top-p choose among the tokens the grammar allows.

    The fields from ``truncate_prompt_tokens`` on, ``min_tokens``, ``stop_token_ids``,
    ``ignore_eos`` and ``top_k=-1`` have vLLM's names and meanings (vLLM ``SamplingParams``).
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    temperature: float = 1.0
    top_k: int = 0  # 0 = off (-1, vLLM's "off", is read as 0)
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # HF semantics, over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias added to its logit
    bad_words: list[str] = field(default_factory=list)  # strings that may never be generated
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences that may never be generated
    stop: list[str] = field(default_factory=list)  # stop strings, removed from the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # vLLM: no EOS, stop token or stop string ends the completion before this many new tokens
    n: int = 1  # completions per prompt
    num_beams: int = 1  # > 1: beam search (deterministic; sampling controls are ignored)
    length_penalty: float = 1.0
    early_stopping: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob and top-k alternatives
    truncate_prompt: bool = False  # drop the oldest prompt tokens instead of failing when too long
    # vLLM's names and meanings for the rest:
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens (-1: the model's context)
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob and top-k alternatives
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text) at the end of the text
    skip_special_tokens: bool = True  # special tokens (<|endoftext|> with ignore_eos) add no text
    # vLLM's structured outputs: a JSON Schema, regex, choice or grammar the completion must match
    structured_outputs: StructuredOutputsParams | None = None

    DEFAULT_MAX_NEW_TOKENS = 16

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.logit_bias = _token_map(self.logit_bias)  # JSON keys arrive as str
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.top_k == -1 and _is_int(self.top_k):
            self.top_k = 0  # vLLM's way of saying "off"
        _check(isinstance(self.bad_words_ids, (list, tuple)) and all(isinstance(s, (list, tuple))
                                                                       for s in self.bad_words_ids),
               "bad_words_ids", "a list of token id lists", self.bad_words_ids)
        self.bad_words_ids = [list(s) for s in self.bad_words_ids]
        for name in ("stop", "bad_words", "stop_token_ids"):
            value = getattr(self, name)
            _check(isinstance(value, (list, tuple)), name, "a list", value)
            setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        if self.max_new_tokens is not None and self.max_length is not None:
            raise ValueError("give max_new_tokens or max_length, not both")
        if self.max_new_tokens is not None:
            _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens",
                   "an integer >= 0", self.max_new_tokens)
        if self.max_length is not None:
            _check(_is_int(self.max_length) and self.max_length >= 1, "max_length", "an integer >= 1",
                   self.max_length)
        _check(_is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature",
               "in [0, 100] (0 = greedy)", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 or -1 = off)", self.top_k)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_new_tokens is not None:
            _check(self.min_tokens <= self.max_new_tokens, "min_tokens",
                   f"<= max_new_tokens ({self.max_new_tokens})", self.min_tokens)
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(_is_num(self.typical_p) and 0 < self.typical_p <= 1, "typical_p", "in (0, 1]", self.typical_p)
        _check(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 100, "repetition_penalty",
               "in (0, 100] (1.0 = off)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
               "an integer >= 0 (0 = off)", self.no_repeat_ngram_size)
        for token, bias in self.logit_bias.items():
            _check(token >= 0, "logit_bias", "a map of token ids >= 0 to biases", token)
            _check(_is_num(bias) and -100 <= bias <= 100, f"logit_bias[{token}]", "in [-100, 100]", bias)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(all(isinstance(s, str) and s for s in self.bad_words), "bad_words", "a list of non-empty strings",
               self.bad_words)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "a list of token ids >= 0", self.stop_token_ids)
        _check(all(s and all(_is_int(t) and t >= 0 for t in s) for s in self.bad_words_ids), "bad_words_ids",
               "a list of non-empty token id lists (ids >= 0)", self.bad_words_ids)
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        _check(_is_int(self.num_beams) and 1 <= self.num_beams <= 64, "num_beams", "an integer in [1, 64]",
               self.num_beams)
        if self.num_beams > 1:
            _check(self.n <= self.num_beams, "n", f"<= num_beams ({self.num_beams}) with beam search", self.n)
        _check(_is_num(self.length_penalty), "length_penalty", "a finite number", self.length_penalty)
        if self.seed is not None:
            # any int64, as OpenAI and vLLM take it (torch seeds a generator with negative numbers too)
            _check(_is_int(self.seed) and -2**63 <= self.seed < 2**63, "seed", "an integer in [-2**63, 2**63)",
                   self.seed)
        if self.logprobs is not None:
            _check(_is_int(self.logprobs) and 0 <= self.logprobs <= 20, "logprobs", "an integer in [0, 20]",
                   self.logprobs)
        if self.prompt_logprobs is not None:
            _check(_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
                   "an integer in [0, 20]", self.prompt_logprobs)
        if self.truncate_prompt_tokens is not None:
            _check(_is_int(self.truncate_prompt_tokens) and (self.truncate_prompt_tokens >= 1
                                                            or self.truncate_prompt_tokens == -1),
                   "truncate_prompt_tokens", "an integer >= 1, or -1 for the model's context length",
                   self.truncate_prompt_tokens)
        for name in ("ignore_eos", "truncate_prompt", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, "true or false", getattr(self, name))
        if self.structured_outputs is not None:
            _check(isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
                   "a StructuredOutputsParams or a dict of its fields", self.structured_outputs)
            if self.num_beams > 1:
                raise ValueError("structured_outputs is not available with beam search (num_beams > 1): "
                                 "use sampling or greedy decoding (num_beams=1)")
            self.structured_outputs.validate()  # the grammar, checked once: ValueError naming the field

    def check_vocab(self, vocab_size: int) -> None:
        """Check the token ids these params hold against a model's vocabulary of ``vocab_size`` tokens.

        Raises ValueError naming the field (``logit_bias``, ``stop_token_ids``) before any work is done:
        an out-of-vocabulary id would otherwise only fail inside a decoding step.
        """
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary "
                                 f"[0, {vocab_size - 1}]")

    # -- helpers ------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def new_token_budget(self, prompt_len: int, n_positions: int) -> int:
        """New tokens allowed for a prompt of ``prompt_len`` tokens (before the context limit)."""
        if self.max_length is not None:
            if self.max_length < prompt_len:
                raise ValueError(f"max_length ({self.max_length}) is shorter than the prompt ({prompt_len} tokens);"
                                 " use max_new_tokens to count new tokens only")
            return self.max_length - prompt_len
        return self.DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    def with_(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.structured_outputs is not None:  # its own fields only (not its compiled grammar)
            out["structured_outputs"] = self.structured_outputs.to_dict()
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, naming any that is not a generation control."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"unknown generation parameter(s): {', '.join(unknown)}; "
                            f"known: {', '.join(cls.field_names())}")
        return cls(**kwargs)
