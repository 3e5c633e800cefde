"""How a forward of a :class:`~gpt2lab.model.GPT2` runs: the one place that decides, for every cached
forward, between gpt2lab's C kernels (CPU), a replayed CUDA graph (a decode step on a GPU) and the
model's own eager PyTorch code.

The model (:mod:`gpt2lab.model.gpt2`) knows nothing of who runs it: ``model(idx, input_pos=...)`` is
always its plain PyTorch code. Code that generates asks this module instead:

- :func:`forward`: any cached forward (a prefill, ragged rows, a decode step of some rows);
- :func:`decode`: one decode step of the running rows ``0..n-1`` (the engine's layout), which may
  replay a CUDA graph;
- :func:`unchanged_weights` / :func:`recheck_weights`: a loop that owns the model promises its tensors
  stay the same, so the kernels' runner is checked once per block instead of before each forward.

Both take ``lora=``: a :class:`~gpt2lab.model.multi_lora.LoRAMapping` giving each row its LoRA adapter (or
none); the base weights are read once and each row adds its adapter's low-rank products.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.cuda_graphs import graph_decoder
from ..model.fast import inference_runner, recheck_weights, unchanged_weights
from ..model.gpt2 import GPT2
from ..model.multi_lora import LoRAMapping, lora_hooks

__all__ = ["forward", "decode", "unchanged_weights", "recheck_weights", "inference_runner"]


def forward(model: GPT2, idx: torch.Tensor, *, input_pos: torch.Tensor, rows: slice | None = None,
            logits_index: torch.Tensor | None = None, lora: LoRAMapping | None = None) -> torch.Tensor:
    """A cached forward: logits for tokens ``idx [B, T]`` at positions ``input_pos [B, T]`` of cache rows
    ``rows`` (default ``0..B-1``); ``[B, V]`` at ``logits_index [B]`` when given, else ``[B, T, V]``.
    ``lora``: each row's LoRA adapter (None: the base model for every row).

    Runs on gpt2lab's C kernels where they can run this model (:func:`inference_runner`), else on the
    model's PyTorch code; both give the same logits within fp32 rounding. Raises as
    :meth:`GPT2.forward` does (``RuntimeError`` without a KV cache, ``ValueError``/``IndexError`` for
    positions, rows or token ids outside it).
    """
    runner = inference_runner(model)
    if runner is not None:
        return runner(idx, input_pos, rows, logits_index, lora)
    with lora_hooks(model, lora, idx.shape[1]):
        return model(idx, input_pos=input_pos, rows=rows, logits_index=logits_index)


def decode(model: GPT2, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int] | int, *,
           lora: LoRAMapping | None = None) -> torch.Tensor:
    """One decode step of cache rows ``0..n-1``: next-token logits ``[n, V]`` for ``tokens`` (``n`` ints, or
    a 1-D tensor on the model's device) at ``positions`` (one int per row, or one int for all); ``lora``:
    each row's adapter, as :func:`forward`'s.

    On a GPU in eval mode (and ``GPT2LAB_CUDA_GRAPHS`` not ``0``) the step replays a captured CUDA graph
    (:mod:`gpt2lab.model.cuda_graphs`) unless a row uses a LoRA adapter; elsewhere it is :func:`forward`
    with one token per row."""
    graphs = graph_decoder(model) if lora is None else None
    if graphs is not None:
        return graphs.decode(tokens, positions)
    device = model.wte.weight.device
    idx = torch.as_tensor(tokens, dtype=torch.long, device=device).reshape(-1, 1)
    n = idx.shape[0]
    if isinstance(positions, int):
        pos = torch.full((n, 1), positions, dtype=torch.long, device=device)
    else:
        pos = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(n, 1)
    return forward(model, idx, input_pos=pos, rows=slice(0, n), lora=lora)[:, -1]
