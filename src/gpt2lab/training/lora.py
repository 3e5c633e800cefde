"""LoRA adapters, as the training loop uses them (kept for the names the docs show).

The module swap (:class:`LoRALinear`, :func:`apply_lora`, :func:`merge_lora`, ...) lives in
:mod:`gpt2lab.model.lora`; reading and writing adapters in ``peft``'s format (:func:`load_adapter`,
:func:`fill_adapter_dir`, :func:`read_adapter_config`, ...) in :mod:`gpt2lab.checkpoints.adapters`.
"""

from __future__ import annotations

from ..checkpoints.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_base_model,
    adapter_config,
    fill_adapter_dir,
    load_adapter,
    read_adapter_config,
)
from ..model.lora import (
    TARGETS,
    LoRALinear,
    adapter_state,
    apply_lora,
    load_adapter_state,
    lora_modules,
    merge_lora,
    parse_targets,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "TARGETS", "LoRALinear", "adapter_base_model", "adapter_config",
           "adapter_state", "apply_lora", "fill_adapter_dir", "load_adapter", "load_adapter_state", "lora_modules",
           "merge_lora", "parse_targets", "read_adapter_config"]
