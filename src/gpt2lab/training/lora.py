"""LoRA: low-rank adapters on chosen ``nn.Linear`` projections of a :class:`GPT2`.

``W x`` becomes ``W x + (alpha / r) * B A x`` with ``A [r, in]`` (small random) and ``B [out, r]``
(zeros), so training starts from the unchanged model and only ``A`` and ``B`` learn. An adapter is
saved on its own (``adapter_model.safetensors`` + ``adapter_config.json``) and can be merged into the
base weights, giving a plain GPT-2 checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# the projections of a GPT-2 block, by the last part of their module name
TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
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
        """A plain ``nn.Linear`` with the update folded into its weight."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.lora_B @ self.lora_A) * self.scale)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [t for t in names if t]
    bad = [t for t in names if t not in TARGETS]
    if not names or bad:
        raise ValueError(f"LoRA targets must be a comma-separated subset of {', '.join(TARGETS)}; got {targets!r}")
    return names


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | Sequence[str] = "c_attn",
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Freeze ``model`` and wrap the targeted projections with adapters; the wrapped module names."""
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
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha, dropout, gen))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"LoRA targets {', '.join(names)} match no nn.Linear in the model")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed ``<module>.lora_A`` / ``<module>.lora_B``."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A"] = m.lora_A.detach().clone()
        state[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
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
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_config(model: nn.Module, base_model: str | None, targets: str | Sequence[str]) -> dict:
    modules = lora_modules(model)
    first = next(iter(modules.values()))
    return {"peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "target_modules": parse_targets(targets),
            "modules": sorted(modules), "base_model_name_or_path": base_model}


def fill_adapter_dir(model: nn.Module, directory: Path, base_model: str | None,
                     targets: str | Sequence[str]) -> None:
    """Write the adapter files into ``directory`` (callers wrap this in an atomic directory write)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in adapter_state(model).items()},
              str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base_model, targets), indent=2) + "\n")


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap ``model`` as described by ``directory/adapter_config.json`` and load the adapter weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (not a LoRA adapter folder?)")
    cfg = json.loads(cfg_path.read_text())
    modules = set(cfg["modules"])
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name in modules and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, cfg["r"], cfg["lora_alpha"]))
    load_adapter_state(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    return model
