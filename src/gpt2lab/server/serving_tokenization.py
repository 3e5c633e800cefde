"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's ``OpenAIServingTokenization``): the served model's tokenizer.

Both run the tokenizer on a worker thread, never on the event loop, and bound what they accept
(:class:`~.limits.Limits`): counting a long text does not hold up ``/health`` or running streams.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from . import limits as lim
from . import protocol as p
from .serving_engine import OpenAIServing, check_token_ids


class OpenAIServingTokenization(OpenAIServing):
    """Text to token ids and back, with the model's tokenizer."""

    @p.returns_errors
    async def create_tokenize(self, request: p.TokenizeRequest) -> p.TokenizeResponse:
        """``request.prompt``'s token ids, their count and the context (``max_model_len``, tokens); 400 for
        a text over ``limits.max_tokenize_chars`` characters, 503 while loading."""
        gen = self.target_for(request).generator
        lim.check_text(request.prompt, self.limits.max_tokenize_chars, "prompt")
        ids = await run_in_threadpool(gen.tokenizer.encode, request.prompt)
        return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=gen.config.n_positions)

    @p.returns_errors
    async def create_detokenize(self, request: p.DetokenizeRequest) -> p.DetokenizeResponse:
        """The text of ``request.tokens``; 400 naming ``tokens`` for an id outside the vocabulary or more
        than ``limits.max_detokenize_tokens`` ids, 503 while loading."""
        gen = self.target_for(request).generator
        if len(request.tokens) > self.limits.max_detokenize_tokens:
            raise p.invalid(f"tokens: at most {self.limits.max_detokenize_tokens} token ids per request (this "
                            f"server's limit), got {len(request.tokens)}", "tokens", "limit_exceeded")

        def decode() -> str:
            check_token_ids(request.tokens, gen.config.vocab_size, "tokens")
            return gen.tokenizer.decode(request.tokens)

        return p.DetokenizeResponse(prompt=await run_in_threadpool(decode))
