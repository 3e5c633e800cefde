"""What generation returns: per-step engine outputs, finished completions, token logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    """One token's log-probability under the model, with the ``top`` most likely alternatives.

    Logprobs are those of the raw model distribution (``log_softmax`` of the logits before
    temperature, penalties or filters), as OpenAI reports them and vLLM's default ``raw_logprobs``
    mode: they describe the model, not the sampler, so they never become ``-inf`` for a chosen token.
    ``top`` is ``[(token_id, token, logprob), ...]``, most likely first.
    """

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence (sample ``index`` of request ``request_id``).

    ``text`` is the new text of this step: never a broken UTF-8 character and never any part of a
    stop string (text that might begin one is held back until it is known not to).
    """

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length" | "error" | None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # finish_reason "error": why this sequence (only) was stopped


@dataclass
class Completion:
    """A finished generation: the new text and tokens only (``prompt`` is kept for reference).

    ``token_ids`` holds every generated token, including the EOS / stop token or the tokens that
    spelled a stop string; ``text`` excludes the EOS and the stop string.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt: str = ""
    index: int = 0


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top_n: int,
                   tokenizer: Tokenizer) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``token_ids[i]`` under row ``i`` of ``logprobs [N, V]``, with ``top_n`` alternatives."""
    import torch

    tok = tokenizer.id_to_token
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, str, float]]] = [[] for _ in token_ids]
    if top_n:
        values, ids = logprobs.topk(top_n, dim=-1)
        tops = [[(t, tok(t), v) for t, v in zip(row_ids, row_values)]
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, tok(t), c, top) for t, c, top in zip(token_ids, chosen, tops)]
