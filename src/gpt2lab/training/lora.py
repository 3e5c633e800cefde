"""LoRA: low-rank adapters on chosen ``nn.Linear`` projections of a :class:`GPT2`.

``W x`` becomes ``W x + (alpha / r) * B A x`` with ``A [r, in]`` (small random) and ``B [out, r]``
(zeros), so training starts from the unchanged model and only ``A`` and ``B`` learn. An adapter is
saved on its own (``adapter_model.safetensors`` + ``adapter_config.json``) in ``peft``'s format, so
``peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)`` loads it, and adapters made by ``peft`` load
here; it can also be merged into the base weights, giving a plain GPT-2 checkpoint.

peft's format for GPT-2: tensor names ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``
(``[r, in]``) and ``...lora_B.weight`` (``[out, r]``), the same shapes as ours: HF's ``Conv1D`` stores
its weight ``[in, out]``, and peft's ``fan_in_fan_out=True`` transposes the update ``B A`` onto it,
which is the ``[out, in]`` update of our ``nn.Linear``. Scale ``lora_alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..readers import read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
# the projections of a GPT-2 block, by the last part of their module name
TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "c_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, use_rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.dropout_p, self.use_rslora = rank, alpha, dropout, use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
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


def _peft_name(module: str) -> str:
    """Our module name -> the one in peft's ``GPT2LMHeadModel`` wrapping (``lm_head`` sits outside ``transformer``)."""
    return _PEFT_PREFIX + (module if module.startswith("lm_head") else f"transformer.{module}")


def _our_name(key: str) -> str:
    return key.removeprefix(_PEFT_PREFIX).removeprefix("transformer.")


def adapter_config(model: nn.Module, base_model: str | None, targets: str | Sequence[str]) -> dict:
    """``adapter_config.json`` in peft's ``LoraConfig`` format (the fields peft reads for a LoRA adapter)."""
    modules = lora_modules(model)
    first = next(iter(modules.values()))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout_p,
            "target_modules": parse_targets(targets), "fan_in_fan_out": True,  # HF GPT-2's Conv1D
            "bias": "none", "use_rslora": first.use_rslora, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}


def fill_adapter_dir(model: nn.Module, directory: Path, base_model: str | None,
                     targets: str | Sequence[str]) -> None:
    """Write the adapter files (peft's format) into ``directory`` (callers wrap this in an atomic
    directory write)."""
    from safetensors.torch import save_file

    state = {}
    for name, m in lora_modules(model).items():
        state[f"{_peft_name(name)}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        state[f"{_peft_name(name)}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base_model, targets), indent=2) + "\n")


def read_adapter_config(directory: str | Path) -> dict:
    """``adapter_config.json`` of an adapter folder, checked to be a LoRA gpt2lab can apply."""
    cfg_path = Path(directory) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (not a LoRA adapter folder?)")
    cfg = read_json(cfg_path)  # ValueError naming the file: not JSON, nested too deep ...
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} "
                         "is not supported; gpt2lab applies LoRA adapters")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication")
                   if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise ValueError(f"{cfg_path}: LoRA settings not supported by gpt2lab: {', '.join(unsupported)}")
    _check_config_values(cfg, cfg_path)
    return cfg


MAX_RANK = 1 << 16  # far past any adapter (peft's defaults are 8-64); the tensors must agree anyway


def _check_config_values(cfg: dict, cfg_path: Path) -> None:
    """The types and ranges of the fields gpt2lab reads, before anything is allocated from them: ``r``
    sizes the adapter matrices (``r=1e9`` asked for 256 GB, ``r=2.5`` or ``true`` failed in torch)."""
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise ValueError(f"{cfg_path}: r (the LoRA rank) must be an integer in [1, {MAX_RANK}], got {r!r}")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{cfg_path}: lora_alpha must be a finite number > 0, got {alpha!r}")
    for key in ("use_rslora", "fan_in_fan_out", "inference_mode"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise ValueError(f"{cfg_path}: {key} must be true or false, got {cfg[key]!r}")
    dropout = cfg.get("lora_dropout", 0.0)
    if dropout is not None and (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
                                or not 0 <= dropout < 1):
        raise ValueError(f"{cfg_path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{cfg_path}: base_model_name_or_path must be a string, got {base!r}")


def _check_adapter_tensors(state: dict[str, torch.Tensor], model: nn.Module, rank: int, weights: Path,
                           cfg_path: Path) -> None:
    """Every adapter tensor against the layer it adapts and the config's ``r``, before any is allocated:
    ``lora_A`` is ``[r, in_features]``, ``lora_B`` ``[out_features, r]``, both floating point, in pairs
    (a rank-1 pair under ``r=4`` was broadcast into the rank-4 matrices without a word)."""
    layers = dict(model.named_modules())
    for key in sorted(state):
        name, _, which = key.rpartition(".")
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{weights}: adapter tensor {key!r} is for {name!r}, which is not a linear layer of "
                             "the model")
        tensor = state[key]
        expected = (rank, layer.in_features) if which == "lora_A" else (layer.out_features, rank)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{weights}: tensor {key} has shape {tuple(tensor.shape)} but {cfg_path.name} says "
                             f"r={rank} and {name} is {layer.in_features} -> {layer.out_features}: expected "
                             f"{expected}")
        if not tensor.is_floating_point():
            raise ValueError(f"{weights}: tensor {key} is {tensor.dtype}; LoRA matrices are floating point")
        partner = f"{name}.{'lora_B' if which == 'lora_A' else 'lora_A'}"
        if partner not in state:
            raise ValueError(f"{weights}: {key} has no {partner.rpartition('.')[2]} to go with it")


def adapter_base_model(directory: str | Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    base = read_adapter_config(directory).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(directory) / ADAPTER_CONFIG}: no base_model_name_or_path; "
                         "load the base model and pass adapter=")
    return str(base)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap ``model``'s projections as ``directory``'s adapter describes and load its weights.

    Reads peft's format (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``), whether
    made by peft or by gpt2lab, and gpt2lab's earlier format (names ``h.0.attn.c_attn.lora_A``).
    """
    from ..checkpoints.tensors import read_tensors  # the checkpoint reader: safetensors, or weights_only pickles

    directory = Path(directory)
    cfg = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if not (directory / "adapter_model.bin").is_file():
            raise FileNotFoundError(f"{weights}: not found (nor adapter_model.bin)")
        weights = directory / "adapter_model.bin"
    raw = dict(read_tensors(weights))  # CheckpointError naming the file when it is truncated or corrupt
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        key = _our_name(key).removesuffix(".weight")
        if key.endswith((".lora_A.default", ".lora_B.default")):
            key = key.removesuffix(".default")
        if not key.endswith((".lora_A", ".lora_B")):
            raise ValueError(f"{weights}: unexpected tensor {key!r} (only LoRA A/B matrices are supported)")
        state[key] = tensor
    if not state:
        raise ValueError(f"{weights}: holds no LoRA tensors")
    rank = int(cfg["r"])
    _check_adapter_tensors(state, model, rank, weights, directory / ADAPTER_CONFIG)
    modules = {k.rpartition(".")[0] for k in state}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name in modules:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, float(cfg["lora_alpha"]),
                                              use_rslora=bool(cfg.get("use_rslora"))))
    ref = next(iter(lora_modules(model).values())).lora_A
    load_adapter_state(model, {k: v.to(dtype=ref.dtype, device=ref.device) for k, v in state.items()})
    return model
