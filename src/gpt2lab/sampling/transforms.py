"""Logits transforms, one small class each, batched with one parameter value per row.

Each class follows its ``transformers`` counterpart (``generation/logits_process.py``) operation for
operation, so on the same inputs it gives the same scores, boundary and tie rules included. The
difference: every parameter is either one value for all rows or a sequence with one value per row,
and a row whose value means "off" (``top_k=0``, ``top_p=1``, ...) comes out untouched. The server
relies on this to batch requests with different settings.

All transforms are called as ``transform(scores, histories, prompt_lens)`` with ``scores`` of shape
``[B, V]``; ``histories[i]`` is row i's prompt + generated ids so far and ``prompt_lens[i]`` splits
them. Transforms that do not look at the history accept ``None`` for both. The ones that do keep
per-row counts and update them with the tokens appended since their previous call, so a step costs
O(new tokens), not O(history); a row whose history is not an extension of the previous call's (a
new request in that slot) is recounted from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .. import kernels

ParamValues = float | Sequence[float]

NEG_INF = float("-inf")


# -- argument handling ------------------------------------------------------------------------------


def _values(name: str, value: ParamValues, ok, allowed: str, integer: bool = False) -> list:
    """One checked value per row (a one-element list stands for "every row")."""
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        raise ValueError(f"{name} must be a value or a non-empty sequence of values, got {value!r}")
    for v in values:
        is_num = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not is_num or (integer and not isinstance(v, int)) or not ok(v):
            raise ValueError(f"{name} must be {allowed}, got {v!r}")
    return values


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` as a ``[R, 1]`` tensor for broadcasting against ``[R, V]`` scores (``R`` may be 1)."""
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device).unsqueeze(1)


def _check_rows(name: str, values: list, scores: torch.Tensor) -> None:
    if len(values) not in (1, scores.shape[0]):
        raise ValueError(f"{name}: got {len(values)} per-row values for a batch of {scores.shape[0]} rows")


def _check_min_keep(min_tokens_to_keep: int) -> int:
    if not isinstance(min_tokens_to_keep, int) or isinstance(min_tokens_to_keep, bool) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")
    return min_tokens_to_keep


def _ban_(scores: torch.Tensor, rows: list[int], cols: list[int]) -> None:
    """Set ``scores[rows[j], cols[j]]`` to -inf, in place."""
    index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
    scores.index_put_(index, torch.tensor(NEG_INF, dtype=scores.dtype, device=scores.device))


class LogitsTransform:
    """Base class: ``transform(scores [B, V], histories, prompt_lens) -> new scores [B, V]``.

    ``apply_`` does the same in place (and returns ``scores``): a pipeline that owns its copy of the
    logits saves one allocation per transform and step. ``active`` is False when every row has the
    transform switched off, so a pipeline can skip it.
    """

    active: bool = True

    def __call__(self, scores: torch.Tensor, histories: Sequence[Sequence[int]] | None = None,
                 prompt_lens: Sequence[int] | None = None) -> torch.Tensor:
        return self.apply_(scores.clone(), histories, prompt_lens)

    def apply_(self, scores: torch.Tensor, histories: Sequence[Sequence[int]] | None = None,
               prompt_lens: Sequence[int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "active")
        return f"{type(self).__name__}({fields})"


# -- history bookkeeping ----------------------------------------------------------------------------


class _History:
    """Per-row copies of the histories seen so far; reports how much of each row is new."""

    def __init__(self) -> None:
        self.copies: list[list[int]] = []
        self.starts: list[int] = []

    def update(self, histories: Sequence[Sequence[int]], starts: Sequence[int]) -> list[int]:
        """Per row, the length already processed (0 means: start this row over)."""
        if len(histories) != len(self.copies):
            self.copies = [[] for _ in histories]
            self.starts = [0] * len(histories)
        old_lens = []
        for i, (history, start) in enumerate(zip(histories, starts)):
            copy = self.copies[i]
            n = len(copy)
            if n and (start != self.starts[i] or len(history) < n or list(history[:n]) != copy):
                copy.clear()
                n = 0
            copy.extend(history[n:])
            self.starts[i] = start
            old_lens.append(n)
        return old_lens


class _TokenIds:
    """The histories as a ``[B, L]`` id tensor, kept up to date with the new tokens of each call.

    Positions past a row's length hold the row's first token: for set-like uses (gather, penalise,
    scatter) repeating a token of the row changes nothing.
    """

    def __init__(self) -> None:
        self.history = _History()
        self.ids: torch.Tensor | None = None

    def update(self, scores: torch.Tensor, histories: Sequence[Sequence[int]] | None) -> tuple[torch.Tensor, list]:
        batch, vocab = scores.shape
        if histories is None or len(histories) != batch:
            raise ValueError(f"histories must give one token list per row ({batch} rows)")
        if self.ids is None or self.ids.shape[0] != batch or self.ids.device != scores.device:
            self.ids = torch.zeros(batch, 0, dtype=torch.long, device=scores.device)
            self.history = _History()
        old_lens = self.history.update(histories, [0] * batch)
        copies = self.history.copies
        lengths = [len(c) for c in copies]
        pads = [c[0] if c else 0 for c in copies]
        capacity = self.ids.shape[1]
        if max(lengths) > capacity:  # grow geometrically: a step usually adds one column
            grown = torch.tensor(pads, device=scores.device).unsqueeze(1).repeat(1, max(max(lengths), 2 * capacity, 64))
            grown[:, :capacity] = self.ids
            self.ids = grown
        rows, cols, tokens = [], [], []
        for i, old in enumerate(old_lens):
            if old == 0:
                self.ids[i] = pads[i]
            new = copies[i][old:]
            rows.extend([i] * len(new))
            cols.extend(range(old, lengths[i]))
            tokens.extend(new)
        if tokens:
            tok = torch.tensor(tokens, dtype=torch.long, device=scores.device)
            if int(tok.min()) < 0 or int(tok.max()) >= vocab:
                raise ValueError(f"histories contain token ids outside the vocabulary [0, {vocab})")
            self.ids.index_put_((torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)),
                                tok)
        return self.ids[:, :max(max(lengths), 1)], lengths


# -- processors (look at the history; apply to greedy rows too) ------------------------------------


class LogitBias(LogitsTransform):
    """Add ``biases[i][token]`` to row i's logit of ``token`` (OpenAI ``logit_bias``)."""

    def __init__(self, biases: Sequence[Mapping[int, float]], vocab_size: int) -> None:
        rows, cols, vals = [], [], []
        for i, bias in enumerate(biases):
            for token, value in bias.items():
                if not (isinstance(token, int) and 0 <= token < vocab_size):
                    raise ValueError(f"logit_bias: token id {token!r} is outside the vocabulary [0, {vocab_size})")
                if not (isinstance(value, (int, float)) and math.isfinite(value)):
                    raise ValueError(f"logit_bias[{token}] must be a finite number, got {value!r}")
                rows.append(i)
                cols.append(token)
                vals.append(float(value))
        self.num_rows = len(biases)
        self._index = (rows, cols, vals)
        self.active = bool(rows)

    def apply_(self, scores, histories=None, prompt_lens=None):
        if scores.shape[0] != self.num_rows:
            raise ValueError(f"logit_bias: built for {self.num_rows} rows, got {scores.shape[0]}")
        rows, cols, vals = self._index
        if rows:
            index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
            scores.index_put_(index, torch.tensor(vals, dtype=scores.dtype, device=scores.device), accumulate=True)
        return scores


class BadWords(LogitsTransform):
    """Ban token sequences per row, like ``NoBadWordsLogitsProcessor``.

    A one-token sequence is always banned; the last token of a longer one is banned when the row's
    history ends with the rest of it.
    """

    def __init__(self, bad_words_ids: Sequence[Sequence[Sequence[int]]], vocab_size: int) -> None:
        singles_rows, singles_cols = [], []
        # per row: last token of the prefix -> [(prefix, banned token)], so a step checks few sequences
        self._multi: list[dict[int, list[tuple[list[int], int]]]] = []
        for i, sequences in enumerate(bad_words_ids):
            multi: dict[int, list[tuple[list[int], int]]] = {}
            for seq in {tuple(s) for s in sequences}:
                if not seq or not all(isinstance(t, int) and 0 <= t < vocab_size for t in seq):
                    raise ValueError(f"bad_words_ids: each sequence must be a non-empty list of token ids in "
                                     f"[0, {vocab_size}), got {list(seq)!r}")
                if len(seq) == 1:
                    singles_rows.append(i)
                    singles_cols.append(seq[0])
                else:
                    multi.setdefault(seq[-2], []).append((list(seq[:-1]), seq[-1]))
            self._multi.append(multi)
        self.num_rows = len(bad_words_ids)
        self._singles = (singles_rows, singles_cols)
        self.active = bool(singles_rows) or any(self._multi)

    def apply_(self, scores, histories=None, prompt_lens=None):
        if scores.shape[0] != self.num_rows:
            raise ValueError(f"bad_words: built for {self.num_rows} rows, got {scores.shape[0]}")
        rows, cols = list(self._singles[0]), list(self._singles[1])
        if any(self._multi):
            if histories is None or len(histories) != self.num_rows:
                raise ValueError(f"histories must give one token list per row ({self.num_rows} rows)")
            for i, multi in enumerate(self._multi):
                history = histories[i]
                if not multi or not history:
                    continue
                for prefix, banned in multi.get(history[-1], ()):
                    if len(prefix) <= len(history) and list(history[len(history) - len(prefix):]) == prefix:
                        rows.append(i)
                        cols.append(banned)
        if rows:
            _ban_(scores, rows, cols)
        return scores


class MinTokens(LogitsTransform):
    """Forbid ending a row before it has ``min_tokens`` new tokens, like transformers'
    ``MinNewTokensLengthLogitsProcessor`` and vLLM's ``min_tokens``: the row's end ids (EOS and stop
    token ids) are banned while ``len(history) - prompt_len < min_tokens``."""

    def __init__(self, min_tokens: int | Sequence[int], end_ids: Sequence[Sequence[int]]) -> None:
        values = _values("min_tokens", min_tokens, lambda v: v >= 0, "an integer >= 0", integer=True)
        if len(end_ids) != len(values):
            raise ValueError(f"min_tokens: end_ids must give one list per row ({len(values)}), got {len(end_ids)}")
        self.min_tokens = values
        self._end_ids = [sorted(set(ids)) for ids in end_ids]
        self.active = any(m > 0 and ids for m, ids in zip(values, self._end_ids))

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("min_tokens", self.min_tokens, scores)
        if histories is None or prompt_lens is None:
            raise ValueError("min_tokens needs each row's history and prompt length")
        rows, cols = [], []
        for i, (minimum, ids) in enumerate(zip(self.min_tokens, self._end_ids)):
            if minimum and len(histories[i]) - prompt_lens[i] < minimum:
                rows.extend([i] * len(ids))
                cols.extend(ids)
        if rows:
            _ban_(scores, rows, cols)
        return scores


class RepetitionPenalty(LogitsTransform):
    """``RepetitionPenaltyLogitsProcessor``: for every token in the prompt + generated ids, divide a
    positive logit by ``penalty`` and multiply a negative one. 1.0 = off.

    Like transformers it gathers and scatters the history's ids, O(history) rather than O(vocab).
    """

    def __init__(self, penalty: ParamValues) -> None:
        self.penalty = _values("repetition_penalty", penalty, lambda v: v > 0, "> 0 (1.0 = off)")
        self.active = any(v != 1.0 for v in self.penalty)
        self._ids = _TokenIds()

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("repetition_penalty", self.penalty, scores)
        ids, lengths = self._ids.update(scores, histories)
        penalties = self.penalty * len(lengths) if len(self.penalty) == 1 else list(self.penalty)
        # an empty history's padding is no seen token: no penalty for that row
        # A penalty below the dtype's smallest normal number (1e-300 in float32) would round to 0: then a
        # banned seen token (-inf) times 0 is NaN, and a seen 0 divided by 0 too. The smallest normal
        # keeps the limit's order (negatives to -0, positives above all else) and -inf at -inf.
        penalty = _column([p if n else 1.0 for p, n in zip(penalties, lengths)], scores).clamp_(
            min=torch.finfo(scores.dtype).tiny)
        score = scores.gather(1, ids)
        # A tiny penalty would overflow float32 (score / 1e-40 = inf, and inf - inf = nan later). Divide
        # by no less than what keeps the largest seen score finite: the same value wherever the plain
        # division is finite, and otherwise the limit as the penalty goes to 0 (the largest seen
        # positive score dominates every other token), finitely and in the same order.
        ceiling = torch.finfo(scores.dtype).max / 4
        divisor = torch.maximum(penalty, score.clamp(min=0).amax(dim=1, keepdim=True) / ceiling)
        score = torch.where(score < 0, score * penalty, score / divisor)
        return scores.scatter_(1, ids, score)


class PresenceFrequencyPenalty(LogitsTransform):
    """OpenAI's penalties over the generated ids only:
    ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``. 0.0 = off.

    The ``[B, V]`` penalty is kept between calls and updated only where a new token arrived, so a
    step costs one subtraction over the scores.
    """

    def __init__(self, presence_penalty: ParamValues = 0.0, frequency_penalty: ParamValues = 0.0) -> None:
        self.presence_penalty = _values("presence_penalty", presence_penalty, lambda v: True, "a finite number")
        self.frequency_penalty = _values("frequency_penalty", frequency_penalty, lambda v: True, "a finite number")
        self.active = any(v != 0 for v in self.presence_penalty + self.frequency_penalty)
        self._history = _History()
        self._counts: torch.Tensor | None = None  # [B, V] occurrences among the generated ids
        self._penalty: torch.Tensor | None = None  # [B, V] what to subtract

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("presence_penalty", self.presence_penalty, scores)
        _check_rows("frequency_penalty", self.frequency_penalty, scores)
        batch, vocab = scores.shape
        if histories is None or len(histories) != batch:
            raise ValueError(f"histories must give one token list per row ({batch} rows)")
        if prompt_lens is None or len(prompt_lens) != batch:
            raise ValueError(f"prompt_lens must give one length per row ({batch} rows)")
        if self._counts is None or self._counts.shape != scores.shape or self._counts.device != scores.device:
            self._counts = torch.zeros(batch, vocab, dtype=torch.float32, device=scores.device)
            self._penalty = torch.zeros_like(scores)
            self._history = _History()
        old_lens = self._history.update(histories, list(prompt_lens))
        rows, tokens, fresh = [], [], []
        for i, old in enumerate(old_lens):
            if old == 0:
                fresh.append(i)
            new = self._history.copies[i][max(old, prompt_lens[i]):]
            rows.extend([i] * len(new))
            tokens.extend(new)
        if fresh:
            self._counts[fresh] = 0
            self._penalty[fresh] = 0
        if tokens:
            tok = torch.tensor(tokens, dtype=torch.long, device=scores.device)
            if int(tok.min()) < 0 or int(tok.max()) >= vocab:
                raise ValueError(f"histories contain token ids outside the vocabulary [0, {vocab})")
            row = torch.tensor(rows, dtype=torch.long, device=scores.device)
            self._counts.index_put_((row, tok), torch.ones_like(tok, dtype=torch.float32), accumulate=True)
            counts = self._counts[row, tok]
            pick = row if len(self.presence_penalty) > 1 else torch.zeros_like(row)
            presence = _column(self.presence_penalty, scores).squeeze(1)[pick]
            pick = row if len(self.frequency_penalty) > 1 else torch.zeros_like(row)
            frequency = _column(self.frequency_penalty, scores).squeeze(1)[pick]
            self._penalty[row, tok] = presence * (counts > 0) + frequency * counts
        return scores.sub_(self._penalty)


class NoRepeatNGram(LogitsTransform):
    """``NoRepeatNGramLogitsProcessor``: ban every token that would complete an n-gram already in
    the row's prompt + generated ids. 0 = off."""

    def __init__(self, ngram_size: int | Sequence[int]) -> None:
        self.ngram_size = _values("no_repeat_ngram_size", ngram_size, lambda v: v >= 0, "an integer >= 0 (0 = off)",
                                  integer=True)
        self.active = any(self.ngram_size)
        self._history = _History()
        self._ngrams: list[dict[tuple[int, ...], set[int]]] = []

    def apply_(self, scores, histories=None, prompt_lens=None):
        batch = scores.shape[0]
        _check_rows("no_repeat_ngram_size", self.ngram_size, scores)
        if histories is None or len(histories) != batch:
            raise ValueError(f"histories must give one token list per row ({batch} rows)")
        sizes = self.ngram_size * batch if len(self.ngram_size) == 1 else self.ngram_size
        old_lens = self._history.update(histories, [0] * batch)
        if len(self._ngrams) != batch:
            self._ngrams = [{} for _ in range(batch)]
        rows, cols = [], []
        for i, (n, old) in enumerate(zip(sizes, old_lens)):
            if not n:
                continue
            seq, ngrams = self._history.copies[i], self._ngrams[i]
            if old == 0:
                ngrams.clear()
            for end in range(max(old, n - 1), len(seq)):  # n-grams ending at the new tokens
                ngrams.setdefault(tuple(seq[end - n + 1:end]), set()).add(seq[end])
            if len(seq) >= n:
                banned = ngrams.get(tuple(seq[len(seq) - n + 1:]), ())
                rows.extend([i] * len(banned))
                cols.extend(banned)
        if rows:
            _ban_(scores, rows, cols)
        return scores


# -- warpers (shape the sampling distribution; skipped for greedy rows) ----------------------------


class Temperature(LogitsTransform):
    """``TemperatureLogitsWarper``: ``scores / temperature``. 1.0 = off; greedy (0) is not a warp."""

    def __init__(self, temperature: ParamValues) -> None:
        self.temperature = _values("temperature", temperature, lambda v: v > 0, "> 0 (use greedy for 0)")
        self.active = any(v != 1.0 for v in self.temperature)

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("temperature", self.temperature, scores)
        # a temperature below float32's smallest normal number would round to 0 (0 / 0 = nan)
        temperature = _column(self.temperature, scores).clamp_(min=torch.finfo(scores.dtype).tiny)
        row_max = scores.amax(dim=-1, keepdim=True)
        out = scores / temperature
        # Where the plain division overflows (a tiny temperature), divide the distance to the row's
        # maximum instead: softmax does not change, and the limit as the temperature goes to 0
        # (all mass on the maximum) comes out finite. Elsewhere the scores are transformers' exactly.
        overflow = ~torch.isfinite(out.amax(dim=-1, keepdim=True)) & torch.isfinite(row_max)
        if bool(overflow.any()):
            out = torch.where(overflow, (scores - row_max) / temperature, out)
        return scores.copy_(out)


class TopK(LogitsTransform):
    """``TopKLogitsWarper``: keep the ``top_k`` highest logits and every logit tied with the k-th.
    0 = off."""

    def __init__(self, top_k: int | Sequence[int], min_tokens_to_keep: int = 1) -> None:
        self.top_k = _values("top_k", top_k, lambda v: v >= 0, "an integer >= 0 (0 = off)", integer=True)
        self.min_tokens_to_keep = _check_min_keep(min_tokens_to_keep)
        self.active = any(self.top_k)

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("top_k", self.top_k, scores)
        vocab = scores.shape[-1]
        ks = [min(max(k, self.min_tokens_to_keep), vocab) if k else 0 for k in self.top_k]
        if not any(ks):
            return scores
        if kernels.top_k_(scores, ks * scores.shape[0] if len(ks) == 1 else ks):  # the same, in one C pass
            return scores
        kth = torch.topk(scores, max(ks)).values  # [B, max k], descending
        pick = _column([max(k, 1) - 1 for k in ks], scores, torch.long).expand(scores.shape[0], 1)
        threshold = kth.gather(1, pick)
        if not all(ks):
            threshold = threshold.masked_fill(_column(ks, scores, torch.long) == 0, NEG_INF)
        return scores.masked_fill_(scores < threshold, NEG_INF)


class TopP(LogitsTransform):
    """``TopPLogitsWarper``: keep the most likely tokens whose probability adds up to ``top_p``; the
    token that crosses ``top_p`` is kept. 1.0 = off."""

    def __init__(self, top_p: ParamValues, min_tokens_to_keep: int = 1) -> None:
        self.top_p = _values("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1.0 = off)")
        self.min_tokens_to_keep = _check_min_keep(min_tokens_to_keep)
        self.active = any(v < 1 for v in self.top_p)

    # Fast path: if the m most likely tokens hold more than top_p + _MARGIN, every other token is
    # dropped, and the m decide among themselves; a topk of m is far cheaper than sorting 50k logits.
    _MARGIN = 1e-4  # far above float32 rounding of the cumulative sum, so the decision is the same
    _FIRST_M = 128

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("top_p", self.top_p, scores)
        vocab = scores.shape[-1]
        if all(p < 1 for p in self.top_p) and self.min_tokens_to_keep <= self._FIRST_M:
            probs = scores.softmax(dim=-1)
            need = _column([p + self._MARGIN for p in self.top_p], scores)
            m = self._FIRST_M
            while 4 * m <= vocab:
                top = probs.topk(m, dim=-1)
                if bool((top.values.sum(dim=-1, keepdim=True) >= need).all()):
                    return self._apply_top(scores, probs, top.values, top.indices)
                m *= 4
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # 1 - p in double precision, then rounded to the scores' dtype, exactly as transformers does;
        # -1 makes the comparison false everywhere for rows that have top_p off.
        limit = _column([1 - p if p < 1 else -1.0 for p in self.top_p], scores)
        sorted_remove = cumulative_probs <= limit
        sorted_remove[..., -self.min_tokens_to_keep:] = False
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        return scores.masked_fill_(remove, NEG_INF)

    def _apply_top(self, scores: torch.Tensor, probs: torch.Tensor, values: torch.Tensor,
                   indices: torch.Tensor) -> torch.Tensor:
        """The sorted pass above on the top tokens only, the rest of the mass counted first."""
        outside = probs.sum(dim=-1, keepdim=True) - values.sum(dim=-1, keepdim=True)
        ascending = torch.cat([outside, values.flip(-1)], dim=-1)
        cumulative_probs = ascending.cumsum(dim=-1)[:, 1:]
        sorted_remove = cumulative_probs <= _column([1 - p for p in self.top_p], scores)
        sorted_remove[..., -self.min_tokens_to_keep:] = False
        remove = torch.ones_like(scores, dtype=torch.bool).scatter_(1, indices.flip(-1), sorted_remove)
        return scores.masked_fill_(remove, NEG_INF)


class MinP(LogitsTransform):
    """``MinPLogitsWarper``: drop tokens less likely than ``min_p`` times the most likely one.
    0.0 = off."""

    def __init__(self, min_p: ParamValues, min_tokens_to_keep: int = 1) -> None:
        self.min_p = _values("min_p", min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0.0 = off)")
        self.min_tokens_to_keep = _check_min_keep(min_tokens_to_keep)
        self.active = any(v > 0 for v in self.min_p)

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("min_p", self.min_p, scores)
        probs = torch.softmax(scores, dim=-1)
        top_probs = probs.amax(dim=-1, keepdim=True)
        remove = probs < _column(self.min_p, scores) * top_probs  # min_p = 0 removes nothing
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        remove.scatter_(-1, torch.topk(probs, k, dim=-1).indices, False)
        return scores.masked_fill_(remove, NEG_INF)


class TypicalP(LogitsTransform):
    """``TypicalLogitsWarper`` (locally typical sampling): keep the tokens whose surprisal is closest
    to the entropy until their probability adds up to ``typical_p``. 1.0 = off."""

    def __init__(self, typical_p: ParamValues, min_tokens_to_keep: int = 1) -> None:
        self.typical_p = _values("typical_p", typical_p, lambda v: 0 < v <= 1, "in (0, 1] (1.0 = off)")
        self.min_tokens_to_keep = _check_min_keep(min_tokens_to_keep)
        self.active = any(v < 1 for v in self.typical_p)

    def apply_(self, scores, histories=None, prompt_lens=None):
        _check_rows("typical_p", self.typical_p, scores)
        normalized = torch.nn.functional.log_softmax(scores, dim=-1)
        p = torch.exp(normalized)
        ent = -(normalized * p).nansum(-1, keepdim=True)
        shifted_scores = torch.abs((-normalized) - ent)
        sorted_scores, sorted_indices = torch.sort(shifted_scores, descending=False)
        sorted_logits = scores.gather(-1, sorted_indices)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        last_ind = (cumulative_probs < _column(self.typical_p, scores)).sum(dim=1)
        last_ind.clamp_(max=sorted_scores.shape[-1] - 1)
        sorted_remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
        sorted_remove[..., :self.min_tokens_to_keep] = False
        if any(v == 1 for v in self.typical_p):
            sorted_remove &= _column(self.typical_p, scores) < 1
        remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
        return scores.masked_fill_(remove, NEG_INF)
