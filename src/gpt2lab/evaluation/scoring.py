"""Token log-likelihoods under a model, batched: the engine behind every perplexity figure.

Sliding windows follow the Hugging Face guide "Perplexity of fixed-length models": windows of up to
``block_size`` tokens start every ``stride`` tokens; a window scores only the tokens after the end of
the previous window (the first window scores all of its tokens but the first, which has no context),
and the loop stops at the window that reaches the end of the text. So every token but the first is
scored exactly once, with up to ``block_size - 1`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..model import GPT2

# rows of [vocab_size] logits materialised at once by the LM head (about 200 MB for GPT-2's vocabulary)
_HEAD_ROWS = 1024
# tokens run through the model per forward pass (windows are packed into batches up to this budget)
DEFAULT_BATCH_TOKENS = 8192
# windows are padded to a multiple of this many tokens (see padded_width)
_WIDTH_STEP = 64
# the LM head runs on at least this many rows (see _head_nll)
_MIN_GEMM_ROWS = 64


@dataclass(frozen=True)
class Window:
    """Tokens ``ids[begin:end]`` of document ``doc`` go through the model; ``ids[first:end]`` are scored."""

    doc: int
    begin: int
    end: int
    first: int


def sliding_windows(n_tokens: int, block_size: int, stride: int, score_from: int = 1) -> list[tuple[int, int, int]]:
    """The guide's loop as ``(begin, end, first)`` triples: ``first`` is the first token this window scores.

    The guide masks all but the last ``trg_len = end - prev_end`` labels of a window with -100 and the
    model drops the first label (it has no logits before it), so a window scores tokens
    ``max(prev_end, begin + 1) .. end - 1``. ``score_from`` additionally leaves earlier tokens unscored
    (a prompt, or a BOS token put in front of a text).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a window needs one token of context), got {block_size}")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        first = max(prev_end, begin + 1, score_from)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def score_windows(model: GPT2, docs: Sequence[Sequence[int]], windows: Sequence[Window], *,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  on_progress: Callable[[int], None] | None = None) -> tuple[list[float], list[int]]:
    """Total negative log-likelihood (nats) and number of scored tokens of each document.

    Windows are packed (right-padded: causal attention makes padding after a token invisible to it)
    into batches of about ``batch_tokens`` tokens. ``on_progress(n)`` is called with the number of
    tokens scored after each batch.

    A document's figures are bit for bit the same whatever other documents it is scored with (so a corpus
    split across processes or Ray actors sums to exactly the one-process figures): a window is padded to
    a width that depends on its own length only (:func:`padded_width`), never to its batch's longest, and
    the LM head never runs on fewer than ``_MIN_GEMM_ROWS`` rows (a matrix product of a few rows takes
    another code path, rounded differently).
    """
    import torch

    n_docs = len(docs)
    nll = torch.zeros(n_docs, dtype=torch.float64)
    counts = [0] * n_docs
    device = model.wte.weight.device
    vocab = model.config.vocab_size
    n_positions = model.config.n_positions
    # longest first, so the memory peak comes at the start; a batch holds windows of one padded width
    order = sorted(windows, key=lambda w: padded_width(w.end - w.begin, n_positions), reverse=True)
    i = 0
    with torch.inference_mode():
        while i < len(order):
            width = padded_width(order[i].end - order[i].begin, n_positions)
            rows = max(1, batch_tokens // width)
            end = i + 1
            while end < min(len(order), i + rows) and \
                    padded_width(order[end].end - order[end].begin, n_positions) == width:
                end += 1
            batch, i = order[i:end], end
            idx = torch.zeros(len(batch), width, dtype=torch.long)
            # select[b, p]: the logits at position p of row b predict a scored token (at p + 1)
            select = torch.zeros(len(batch), width, dtype=torch.bool)
            doc_of_row = torch.empty(len(batch), dtype=torch.long)
            for b, w in enumerate(batch):
                ids = docs[w.doc][w.begin:w.end]
                idx[b, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                select[b, w.first - w.begin - 1:w.end - w.begin - 1] = True
                doc_of_row[b] = w.doc
                counts[w.doc] += w.end - w.first
            if int(idx.max()) >= vocab:
                raise ValueError(f"token id {int(idx.max())} is outside the model's vocabulary ({vocab} tokens)")
            idx = idx.to(device)
            hidden = model.hidden_states(idx)[select.to(device)]  # [N, C], row-major like the targets below
            targets = idx[:, 1:][select[:, :-1].to(device)]
            owner = doc_of_row[:, None].expand_as(select)[select]
            token_nll = torch.cat([_head_nll(model, hidden[s:s + _HEAD_ROWS], targets[s:s + _HEAD_ROWS])
                                   for s in range(0, hidden.shape[0], _HEAD_ROWS)])
            nll.index_add_(0, owner, token_nll.double().cpu())
            if on_progress is not None:
                on_progress(int(select.sum()))
    return nll.tolist(), counts


def padded_width(width: int, n_positions: int) -> int:
    """The width a window of ``width`` tokens is padded to in a batch: the next multiple of
    ``_WIDTH_STEP`` (at most the model's context ``n_positions``). Attention over a longer padded row rounds
    differently, so the width must not depend on the other windows of the batch."""
    return min(-(-width // _WIDTH_STEP) * _WIDTH_STEP, max(width, n_positions))


def _head_nll(model: GPT2, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[N]`` of hidden states ``[N, C]``; fewer than ``_MIN_GEMM_ROWS`` rows are padded with
    zeros, so every row goes through the same matrix-product code path."""
    import torch
    import torch.nn.functional as F

    n = hidden.shape[0]
    if n < _MIN_GEMM_ROWS:
        hidden = torch.cat([hidden, hidden.new_zeros(_MIN_GEMM_ROWS - n, hidden.shape[1])])
    return F.cross_entropy(model.head_logits(hidden)[:n].float(), targets, reduction="none")


def perplexity_of(nll: float, tokens: int) -> float:
    """``exp(mean NLL)``; NaN when nothing was scored."""
    return math.exp(nll / tokens) if tokens else float("nan")
