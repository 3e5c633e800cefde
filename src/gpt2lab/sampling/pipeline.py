"""The per-step logits pipeline for a batch of requests, and the sampler that follows it.

:class:`LogitsPipeline` turns one :class:`SamplingParams` per row into the transforms of
:mod:`.transforms`, in the order ``SamplingParams`` documents, and runs only those that some row
switches on. Greedy rows (``temperature=0``) get the processors (bias, bans, penalties, n-grams) but
not the warpers (temperature and the filters), as in ``transformers`` where warpers only apply when
sampling. When every sampling row uses ``top_k``, the later filters work on the few tokens top-k
kept instead of the whole vocabulary: the same result (the dropped tokens have probability 0) at a
fraction of the cost, since sorting 50k logits per row is the most expensive thing a step can do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import kernels
from .constraint import GrammarState, StructuredOutput
from .params import SamplingParams
from .transforms import (
    NEG_INF,
    BadWords,
    LogitBias,
    LogitsTransform,
    MinP,
    MinTokens,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

# Work on the tokens kept by top-k only when they are at most this fraction of the vocabulary.
_COMPACT_FRACTION = 0.25


def bad_words_ids(tokenizer: Tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token sequences to ban for ``words``: each word as written and with a leading space (how it
    appears mid-sentence in GPT-2's byte-level BPE), without duplicates."""
    sequences: dict[tuple[int, ...], None] = {}
    for word in words:
        for variant in (word, " " + word) if not word.startswith(" ") else (word,):
            ids = tuple(tokenizer.encode(variant))
            if ids:
                sequences[ids] = None
    return [list(s) for s in sequences]


class LogitsPipeline:
    """All of a batch's logits transforms; row i follows ``params[i]``.

    Call it once per decoding step with that step's logits ``[B, V]``, each row's token history
    (prompt + generated so far) and prompt length; it returns new scores with masked tokens at
    ``-inf`` and leaves ``logits`` untouched. The pipeline keeps per-row counts between calls, so
    build one per batch composition and call it every step; a row whose history is not an extension
    of the previous step's is recounted. ``grammar_states``: the rows' structured-output matchers
    (:class:`~.constraint.GrammarState`, kept by the caller across pipelines); made here when not given.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, tokenizer: Tokenizer | None = None,
                 device: torch.device | str | None = None, eos_token_id: int | None = None,
                 grammar_states: Sequence[GrammarState | None] | None = None) -> None:
        if not params:
            raise ValueError("params must hold one SamplingParams per row, got none")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
        self.params = list(params)
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else None
        if any(p.bad_words for p in params) and tokenizer is None:
            raise ValueError("bad_words needs a tokenizer: pass tokenizer= to LogitsPipeline")

        banned = [(bad_words_ids(tokenizer, p.bad_words) if p.bad_words else []) + p.bad_words_ids for p in params]
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
        # min_tokens holds back what would end the row: EOS (``eos_token_id``, unless ignored) and stop ids
        # (an id outside the vocabulary can never be sampled: nothing to hold back)
        end_ids = [[t for t in [*p.stop_token_ids, *([eos_token_id] if eos_token_id is not None and not p.ignore_eos
                                                     else [])] if t < vocab_size] for p in params]
        processors: list[LogitsTransform] = [
            MinTokens([p.min_tokens for p in params], end_ids),
            LogitBias([p.logit_bias for p in params], vocab_size),
            BadWords(banned, vocab_size),
            RepetitionPenalty([p.repetition_penalty for p in params]),
            PresenceFrequencyPenalty([p.presence_penalty for p in params], [p.frequency_penalty for p in params]),
            NoRepeatNGram([p.no_repeat_ngram_size for p in params]),
        ]
        if any(p.structured_outputs is not None for p in params):
            # last of the processors, before the warpers: top-k / top-p then choose among the allowed tokens
            # (a filter that ran first could keep only forbidden ones); grammar_states: the rows' own
            processors.append(StructuredOutput([p.structured_outputs for p in params], vocab_size, tokenizer,
                                               grammar_states, [p.ignore_eos for p in params]))
        self.processors = [t for t in processors if t.active]

        # Warpers see only the sampling rows, in their order.
        self.sampling_rows = [i for i, p in enumerate(params) if not p.greedy]
        rows = [params[i] for i in self.sampling_rows]
        self._all_sampling = len(rows) == len(params)
        self._rows_index: torch.Tensor | None = None
        self.temperature = Temperature([p.temperature for p in rows]) if rows else None
        self.top_k = TopK([p.top_k for p in rows]) if rows else None
        filters: list[LogitsTransform] = [
            TopP([p.top_p for p in rows]),
            MinP([p.min_p for p in rows]),
            TypicalP([p.typical_p for p in rows]),
        ] if rows else []
        self.filters = [t for t in filters if t.active]
        # Every sampling row has top_k on: later filters can work on the kept tokens only.
        self._compact = bool(rows) and all(p.top_k for p in rows)

    @property
    def transforms(self) -> list[LogitsTransform]:
        """The transforms that run, in order."""
        warpers = [t for t in (self.temperature, self.top_k) if t is not None and t.active]
        return self.processors + warpers + self.filters

    def __call__(self, logits: torch.Tensor, histories: Sequence[Sequence[int]],
                 prompt_lens: Sequence[int]) -> torch.Tensor:
        batch = len(self.params)
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must have shape [{batch}, {self.vocab_size}], got {tuple(logits.shape)}")
        if len(histories) != batch or len(prompt_lens) != batch:
            raise ValueError(f"histories and prompt_lens must have one entry per row ({batch}), "
                             f"got {len(histories)} and {len(prompt_lens)}")
        scores = logits.to(dtype=torch.float32, device=self.device, copy=True)
        for transform in self.processors:
            scores = transform.apply_(scores, histories, prompt_lens)
        if not self.sampling_rows:
            return scores
        if self._all_sampling:
            return self._warp(scores)
        if self._rows_index is None or self._rows_index.device != scores.device:
            self._rows_index = torch.tensor(self.sampling_rows, device=scores.device)
        scores[self._rows_index] = self._warp(scores[self._rows_index])
        return scores

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature and the filters on the sampling rows' scores."""
        if self.temperature.active:
            scores = self.temperature.apply_(scores)
        if self.top_k.active:
            scores = self.top_k.apply_(scores)
        if not self.filters:
            return scores
        kept = int((scores > NEG_INF).sum(dim=-1).max()) if self._compact else scores.shape[-1]
        if kept == 0 or kept > _COMPACT_FRACTION * scores.shape[-1]:
            for transform in self.filters:
                scores = transform.apply_(scores)
            return scores
        # The kept tokens of every row (rows keeping fewer get some -inf entries), in token-id order so
        # that tie rules match a pass over the whole vocabulary.
        index = torch.topk(scores, kept, dim=-1).indices.sort(dim=-1).values
        compact = scores.gather(-1, index)
        for transform in self.filters:
            compact = transform.apply_(compact)
        return scores.fill_(NEG_INF).scatter_(-1, index, compact)


def sample(scores: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row: the argmax for greedy rows (``temperature=0``), otherwise a draw from
    ``softmax(scores)`` made with that row's generator (``None``: torch's global RNG).

    A draw is an inverse-CDF lookup of one uniform number from the row's own generator, so a seeded
    row picks the same token whatever else is in the batch, and consumes exactly one number per step.
    """
    batch = scores.shape[0] if scores.dim() == 2 else -1
    if len(params) != batch or len(generators) != batch:
        raise ValueError(f"scores must be [B, V] with one params and one generator per row, got "
                         f"{tuple(scores.shape)}, {len(params)} params, {len(generators)} generators")
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return _argmax(scores)
    device = scores.device
    index = None if len(rows) == batch else torch.tensor(rows, device=device)
    sub = scores if index is None else scores[index]
    probs = sub.softmax(dim=-1)
    # the running sums in float64 (exact enough over 50k terms); the kernels add the same numbers in the same
    # order, skipping the zeros that top-k and the other filters leave (most of the vocabulary)
    totals = kernels.row_totals(probs)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64) if totals is None else None
    total = (cdf[:, -1] if totals is None else totals).unsqueeze(1)  # [R, 1]
    if not bool((total > 0).all()):  # NaN or nothing left
        if bool(torch.isnan(sub).any()):
            raise ValueError(NAN_SCORES_ERROR)
        raise ValueError(ALL_MASKED_ERROR)
    # the greedy rows' picks first: they raise where a row is NaN or fully masked
    tokens = None if index is None else _argmax(scores)
    # drawn only once the rows are known to be sound: a call that raises consumes no random numbers,
    # so a batch retried row by row (the engine's fault isolation) draws the same tokens
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    seeded = [j for j, i in enumerate(rows) if generators[i] is not None]
    draws = [torch.rand(len(unseeded), dtype=torch.float64, device=device)] if unseeded else []
    draws += [torch.rand(1, dtype=torch.float64, device=device, generator=generators[rows[j]]) for j in seeded]
    uniforms = [0.0] * len(rows)
    for j, u in zip(unseeded + seeded, torch.cat(draws).tolist()):  # one copy to the host, not one per row
        uniforms[j] = u
    # u * total < total, so the pick is a token whose probability is > 0 (cdf strictly rises there); Python
    # floats are float64, so these are the same roundings as on tensors
    targets = [min(u * t, math.nextafter(t, 0.0)) for u, t in zip(uniforms, total[:, 0].tolist())]
    picked = (torch.searchsorted(cdf, torch.tensor(targets, dtype=torch.float64, device=device)[:, None],
                                 right=True)[:, 0] if cdf is not None else kernels.inverse_cdf(probs, targets))
    if tokens is None:
        return picked
    tokens[index] = picked
    return tokens


ALL_MASKED_ERROR = "a row has every token masked (all scores are -inf); nothing to sample"
NAN_SCORES_ERROR = "the model's scores are NaN (NaN or infinite weights or activations?); no token to pick"


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """The greedy pick of every row; ValueError when a row holds NaN (argmax picks a NaN where there is
    one, so one value per row tells) or has every token masked (its maximum is -inf): either way its token
    would be a meaningless index, usually 0, and a banned one."""
    tokens = scores.argmax(dim=-1)
    picked = scores.gather(-1, tokens.unsqueeze(-1))
    if not bool((picked > NEG_INF).all()):  # false for NaN and for -inf
        if bool(picked.isnan().any()):
            raise ValueError(NAN_SCORES_ERROR)
        raise ValueError(ALL_MASKED_ERROR)
    return tokens
