"""TEMPORARY stand-in for gpt2lab.sampling's LogitsPipeline/sample (temperature and greedy only).

Deleted when the sampling branch is merged; same signatures as the contract in HELPERS.md.
"""

from __future__ import annotations

import torch

from ..sampling import SamplingParams
from ..tokenizer import Tokenizer


class LogitsPipeline:
    def __init__(self, params: list[SamplingParams], vocab_size: int, tokenizer: Tokenizer | None = None,
                 device: torch.device | str | None = None) -> None:
        self.params = params
        self.temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                                  device=device)[:, None]

    def __call__(self, logits: torch.Tensor, histories: list[list[int]], prompt_lens: list[int]) -> torch.Tensor:
        return logits / self.temps


def sample(scores: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    out = scores.argmax(dim=-1)
    probs = None
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            probs = torch.softmax(scores.float(), dim=-1) if probs is None else probs
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out
