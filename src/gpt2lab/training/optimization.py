"""The optimiser set-up: AdamW with nanoGPT's weight-decay groups, and the learning-rate schedule (linear
warmup, then cosine decay to a floor, as nanoGPT and litgpt)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's split: matrices (>= 2-D: linear weights, embeddings) decay; biases and LayerNorms don't."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``cfg``'s betas and weight decay, fused where torch has it."""
    groups = param_groups(model, cfg.weight_decay)
    try:  # the fused kernel (CUDA; CPU since torch 2.4) does the whole update in one pass
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, foreach=True)


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to ``base``, then cosine down to ``min_ratio * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    low = base * min_ratio
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (base - low)
