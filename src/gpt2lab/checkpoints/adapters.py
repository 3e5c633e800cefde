"""LoRA adapters in ``peft``'s format: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

An adapter gpt2lab writes loads in ``peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)``, and adapters
made by ``peft`` load here. peft's format for GPT-2: tensor names
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``), the same shapes as gpt2lab's :class:`~gpt2lab.model.lora.LoRALinear`: HF's ``Conv1D``
stores its weight ``[in, out]``, and peft's ``fan_in_fan_out=True`` transposes the update ``B A`` onto it,
which is the ``[out, in]`` update of our ``nn.Linear``. Scale ``lora_alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``).

:func:`read_adapter` is the one reader (the config checked, the tensors by gpt2lab's module names);
:func:`load_adapter` wraps a model's projections with it (the module swap is :mod:`gpt2lab.model.lora`'s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..model.lora import inject_lora, load_adapter_state, lora_modules, parse_targets
from ..readers import read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def _peft_name(module: str) -> str:
    """Our module name -> the one in peft's ``GPT2LMHeadModel`` wrapping (``lm_head`` sits outside ``transformer``)."""
    return _PEFT_PREFIX + (module if module.startswith("lm_head") else f"transformer.{module}")


def _our_name(key: str) -> str:
    return key.removeprefix(_PEFT_PREFIX).removeprefix("transformer.")


def adapter_config(model: nn.Module, base_model: str | None, targets: str | list[str]) -> dict:
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
                     targets: str | list[str]) -> None:
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


def check_adapter_tensors(state: dict[str, torch.Tensor], model: nn.Module, rank: int, weights: Path,
                          cfg_path: Path) -> None:
    """Every adapter tensor against the layer it adapts and the config's ``r``, before any is allocated:
    ``lora_A`` is ``[r, in_features]``, ``lora_B`` ``[out_features, r]``, both floating point, in pairs
    (a rank-1 pair under ``r=4`` was broadcast into the rank-4 matrices without a word). ``ValueError``
    naming ``weights`` and the tensor."""
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


@dataclass(frozen=True)
class Adapter:
    """An adapter read from a folder: ``rank``, ``alpha``, ``use_rslora`` and its tensors ``state``, keyed
    ``<module>.lora_A`` (``[r, in]``) / ``<module>.lora_B`` (``[out, r]``) by gpt2lab's module names."""

    path: Path
    weights: Path  # the tensors' file
    rank: int
    alpha: float
    use_rslora: bool
    state: dict[str, torch.Tensor]

    @property
    def modules(self) -> list[str]:
        """The adapted modules' names, in the file's order."""
        return list(dict.fromkeys(key.rpartition(".")[0] for key in self.state))


def read_adapter(directory: str | Path) -> Adapter:
    """Read an adapter folder (peft's format, whether made by peft or by gpt2lab, and gpt2lab's earlier
    format with names ``h.0.attn.c_attn.lora_A``): its checked config and its tensors. Raises
    ``FileNotFoundError`` / ``ValueError`` / :class:`~gpt2lab.errors.CheckpointError` naming the file."""
    from .tensors import read_tensors

    directory = Path(directory)
    cfg = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if not (directory / "adapter_model.bin").is_file():
            raise FileNotFoundError(f"{weights}: not found (nor adapter_model.bin)")
        weights = directory / "adapter_model.bin"  # weights_only: it cannot run code
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
    return Adapter(directory, weights, int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora")), state)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap ``model``'s projections as ``directory``'s adapter describes (:class:`~gpt2lab.model.lora.LoRALinear`,
    unmerged) and load its weights; returns ``model``. Errors as :func:`read_adapter`'s, and ``ValueError``
    naming the weights file when its modules are not in the model."""
    adapter = read_adapter(directory)
    check_adapter_tensors(adapter.state, model, adapter.rank, adapter.weights, adapter.path / ADAPTER_CONFIG)
    inject_lora(model, adapter.modules, adapter.rank, adapter.alpha, adapter.use_rslora)
    ref = next(iter(lora_modules(model).values())).lora_A
    load_adapter_state(model, {k: v.to(dtype=ref.dtype, device=ref.device) for k, v in adapter.state.items()})
    return model
