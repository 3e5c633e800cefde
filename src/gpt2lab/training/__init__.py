"""Fine-tuning and training GPT-2 models: data preparation, the training loop, LoRA adapters.

The names below load on first use: loading a model with a LoRA adapter needs only
``gpt2lab.training.lora``, and ``gpt2lab generate`` should not pay for importing the training loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PRESETS, TrainConfig, parse_model_config
    from .data import DataError, TokenData, prepare_data
    from .trainer import Trainer, TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "parse_model_config", "DataError", "TokenData", "prepare_data",
           "TrainResult", "Trainer", "train"]
_LAZY = {"PRESETS": "config", "TrainConfig": "config", "parse_model_config": "config",
         "DataError": "data", "TokenData": "data", "prepare_data": "data",
         "TrainResult": "trainer", "Trainer": "trainer", "train": "trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
