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
    ``top`` is ``[(token_id, token, logprob), ...]``, most likely first. ``rank`` is the token's
    1-based rank in the distribution (1 = most likely; tokens with a higher logprob + 1).
    ``text_span`` (a generated token's; None for prompt tokens): ``(start, end)``, the characters of the
    sequence's decoded text that this token produced. The spans of a sequence's tokens tile its text
    in order (a special token left out of the text, or a byte that only completes a character with
    the next token, has an empty span); past a stop-string cut the text ends before the span does.
    """

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]
    rank: int | None = None
    text_span: tuple[int, int] | None = None


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence (sample ``index`` of request ``request_id``).

    ``text`` is the new text of this step: never a broken UTF-8 character and never any part of a
    stop string (text that might begin one is held back until it is known not to). ``logprobs``
    (when asked for) follow the text: a token's entry comes with the step that releases its text,
    so one step may carry none or several, and tokens after a stop-string cut have none.
    ``prompt_logprobs`` (``SamplingParams.prompt_logprobs``) comes with a sample's first output:
    the entries of prompt tokens 1.. (the first token has none). A beam request's beams are not streamed:
    each of its ``n`` best comes whole, in one output, when the search ends (each with ``prompt_logprobs``).
    """

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length" | "error" | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # finish_reason "error": why this sequence (only) was stopped (see Runner)


@dataclass
class Completion:
    """A finished generation: the new text and tokens only (``prompt`` is kept for reference).

    ``token_ids`` holds every generated token, including the EOS / stop token or the tokens that
    spelled a stop string; ``text`` excludes the EOS and the stop string (unless
    ``include_stop_str_in_output``), and ``logprobs`` end where the text ends.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt: str = ""
    index: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top_n: int,
                   tokenizer: Tokenizer) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``token_ids[i]`` under row ``i`` of ``logprobs [N, V]``, with ``top_n`` alternatives."""
    import torch

    tok = tokenizer.id_to_token
    chosen_t = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])
    ranks = ((logprobs > chosen_t).sum(dim=-1) + 1).tolist()
    chosen = chosen_t[:, 0].tolist()
    tops: list[list[tuple[int, str, float]]] = [[] for _ in token_ids]
    if top_n:
        values, ids = logprobs.topk(top_n, dim=-1)
        tops = [[(t, tok(t), v) for t, v in zip(row_ids, row_values)]
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, tok(t), c, top, r) for t, c, top, r in zip(token_ids, chosen, tops, ranks)]
