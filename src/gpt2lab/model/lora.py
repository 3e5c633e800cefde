"""LoRA: low-rank adapters on chosen ``nn.Linear`` projections of a :class:`~gpt2lab.model.GPT2`, as a
model-level swap of modules (as :mod:`.quantize` swaps them for quantized ones).

``W x`` becomes ``W x + (alpha / r) * B A x`` with ``A [r, in]`` (small random) and ``B [out, r]``
(zeros), so training starts from the unchanged model and only ``A`` and ``B`` learn (Hu et al., 2021,
"LoRA: Low-Rank Adaptation of Large Language Models"; the scale ``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski 2023). :func:`apply_lora` wraps the targeted projections with :class:`LoRALinear`,
:func:`merge_lora` folds every adapter back into its base weight (a plain GPT-2 again).

Reading and writing adapters in ``peft``'s format (``adapter_config.json``, ``adapter_model.safetensors``)
is :mod:`gpt2lab.checkpoints.adapters`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

# the projections of a GPT-2 block, by the last part of their module name
TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj")


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor of the low-rank update: ``alpha / r`` (LoRA), ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, use_rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.dropout_p, self.use_rslora = rank, alpha, dropout, use_rslora
        self.scale = lora_scale(rank, alpha, use_rslora)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        bound = 1 / math.sqrt(base.in_features)  # kaiming-uniform(a=sqrt(5)), as nn.Linear and PEFT do
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight.

        Built with ``skip_init``: ``nn.Linear``'s own initialisation would draw from the global torch RNG,
        so every merge (each checkpoint and publish of a LoRA run) would shift the dropout stream after
        the checkpoint had recorded it, and a resumed run would not continue exactly.
        """
        out = torch.nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,
                                       bias=self.base.bias is not None, device=self.base.weight.device,
                                       dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.lora_B @ self.lora_A) * self.scale)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """The target projections of ``targets`` (comma-separated or a list; each one of :data:`TARGETS`);
    ``ValueError`` naming the allowed ones otherwise."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [t for t in names if t]
    bad = [t for t in names if t not in TARGETS]
    if not names or bad:
        raise ValueError(f"LoRA targets must be a comma-separated subset of {', '.join(TARGETS)}; got {targets!r}")
    return names


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule called ``name`` (``h.0.attn.c_attn``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | Sequence[str] = "c_attn",
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Freeze ``model`` and wrap the targeted projections with adapters; the wrapped module names.
    ``ValueError`` for ``rank < 1``, ``alpha <= 0`` or targets matching no ``nn.Linear``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    names = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _matches(name, names):
            swap_module(model, name, LoRALinear(module, rank, alpha, dropout, gen))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"LoRA targets {', '.join(names)} match no nn.Linear in the model")
    return wrapped


def inject_lora(model: nn.Module, modules: Sequence[str], rank: int, alpha: float,
                use_rslora: bool = False) -> None:
    """Freeze ``model`` and wrap exactly the ``nn.Linear`` modules named in ``modules`` (an adapter read from
    a file says which); ``ValueError`` naming those that are not linear layers of the model."""
    layers = dict(model.named_modules())
    missing = sorted(name for name in modules if not isinstance(layers.get(name), nn.Linear))
    if missing:
        raise ValueError(f"adapter modules not in the model: {missing[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in modules:
        swap_module(model, name, LoRALinear(layers[name], rank, alpha, use_rslora=use_rslora))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed ``<module>.lora_A`` / ``<module>.lora_B``."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A"] = m.lora_A.detach().clone()
        state[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (keys as :func:`adapter_state`'s) into ``model``'s adapters; ``ValueError`` listing
    missing and unexpected keys when they do not fit."""
    modules = lora_modules(model)
    expected = {f"{n}.lora_{ab}" for n in modules for ab in "AB"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            name, _, which = key.rpartition(".")
            getattr(modules[name], which).copy_(tensor)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model becomes a plain GPT-2 again."""
    for name, m in lora_modules(model).items():
        swap_module(model, name, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
