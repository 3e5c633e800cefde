"""Fine-tuning and training GPT-2 models: data preparation, the training loop, LoRA adapters.

The names below load on first use: ``gpt2lab generate`` should not pay for importing the training loop.
LoRA's module swap is :mod:`gpt2lab.model.lora`, its files :mod:`gpt2lab.checkpoints.adapters`
(``gpt2lab.training.lora`` re-exports both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:
    from .config import PRESETS, TrainConfig, parse_model_config
    from .data import DataError, TokenData, prepare_data
    from .trainer import Trainer, TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "parse_model_config", "DataError", "TokenData", "prepare_data",
           "TrainResult", "Trainer", "train"]
_LAZY = {"PRESETS": "config", "TrainConfig": "config", "parse_model_config": "config",
         "DataError": "data", "TokenData": "data", "prepare_data": "data",
         "TrainResult": "trainer", "Trainer": "trainer", "train": "trainer"}


__getattr__ = lazy_getattr(__name__, {name: (f".{module}", name) for name, module in _LAZY.items()})
