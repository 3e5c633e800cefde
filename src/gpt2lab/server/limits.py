"""Every bound on what one client may ask of the server, in one place (documented in docs/server.md).

The server shares one engine thread and one event loop among all clients, so no request may make
either do unbounded work: the body size, the text lengths, the number of stop strings, biases, banned
words and prompts are all limited here, and each excess is a 400 naming the field and the limit (413
for the body). Where OpenAI or vLLM publish a limit the default follows it or is more lenient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import protocol as p

MAX_BODY_MB = 4.0  # --max-body-mb: a 1024-token prompt as token ids is ~7 KB, as text a few KB
# --max-batch: every running row holds a KV cache row at its full length (GPT-2 124M: 75 MB at 1024 tokens), so
# an unbounded count lets a burst of clients take all memory; vLLM's max_num_seqs defaults to 256-1024
MAX_BATCH_LIMIT = 1024
MAX_QUEUE_LIMIT = 65_536  # --max-queue: each waiting request holds its body (up to --max-body-mb)


@dataclass(frozen=True)
class Limits:
    """Per-request bounds. Sizes of texts are in characters (Unicode code points)."""

    max_body_bytes: int = int(MAX_BODY_MB * 2**20)
    max_stop: int = 16  # OpenAI allows 4, vLLM does not limit
    max_stop_chars: int = 256  # each stop string
    max_stop_token_ids: int = 256
    max_logit_bias: int = 300  # entries: this server's own choice
    max_bad_words: int = 64
    max_bad_word_chars: int = 256
    max_messages: int = 1024  # chat messages per request
    chat_context_factor: int = 8  # all messages together: at most this many contexts' worth of characters
    max_tokenize_chars: int = 1_000_000  # /tokenize may count texts longer than the context
    max_detokenize_tokens: int = 1_000_000
    max_structured_chars: int = 32_768  # a structured output's spec (schema, regex, grammar, choices) as JSON text
    structured_compile_s: float = 10.0  # compiling one structured output's grammar (on a worker thread)
    body_timeout_s: float = 30.0  # a request body must arrive within this
    header_timeout_s: float = 30.0  # a connection must send a complete request head within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    chat_render_workers: int = 2  # processes rendering chat templates (a template is code: never in this one)
    chat_probe_timeout_s: float = 60.0  # start-up: a worker starts and renders the probe conversation


def max_prompt_chars(tokenizer: Any, n_positions: int) -> int:
    """The most characters a prompt that fits the context can have: ``n_positions`` tokens of the
    tokenizer's longest token (in UTF-8 bytes, which bound the characters). A longer text cannot fit,
    so it is refused before it is tokenized."""
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    return n_positions * max(longest, 1)


def check_params(params: Any, limits: Limits) -> None:
    """A 400 naming the first field of ``params`` (a SamplingParams) over its limit."""
    def over(field: str, what: str, limit: int, got: int) -> p.APIError:
        return p.invalid(f"{field}: at most {limit} {what} per request (this server's limit), got {got}",
                         field, "limit_exceeded")

    if len(params.stop) > limits.max_stop:
        raise over("stop", "stop strings", limits.max_stop, len(params.stop))
    longest = max((len(s) for s in params.stop), default=0)
    if longest > limits.max_stop_chars:
        raise over("stop", "characters in a stop string", limits.max_stop_chars, longest)
    if len(params.stop_token_ids) > limits.max_stop_token_ids:
        raise over("stop_token_ids", "stop token ids", limits.max_stop_token_ids, len(params.stop_token_ids))
    if len(params.logit_bias) > limits.max_logit_bias:
        raise over("logit_bias", "logit_bias entries", limits.max_logit_bias, len(params.logit_bias))
    if len(params.bad_words) > limits.max_bad_words:
        raise over("bad_words", "bad words", limits.max_bad_words, len(params.bad_words))
    longest = max((len(s) for s in params.bad_words), default=0)
    if longest > limits.max_bad_word_chars:
        raise over("bad_words", "characters in a bad word", limits.max_bad_word_chars, longest)


def check_text(text: str, limit: int, field: str, n_positions: int | None = None) -> None:
    """A 400 if ``text`` is longer than ``limit`` characters (checked before tokenizing it)."""
    if len(text) > limit:
        context = f": this model's context of {n_positions} tokens holds at most {limit} characters" \
            if n_positions is not None else f" (this server's limit is {limit})"
        raise p.invalid(f"{field} has {len(text)} characters, too long{context}", field,
                        "context_length_exceeded" if n_positions is not None else "limit_exceeded")
