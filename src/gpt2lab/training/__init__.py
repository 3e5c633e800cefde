"""Fine-tuning and training GPT-2 models: data preparation, the training loop, LoRA adapters."""

from .config import PRESETS, TrainConfig, parse_model_config
from .data import DataError, TokenData, prepare_data
from .trainer import Trainer, TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "parse_model_config", "DataError", "TokenData", "prepare_data",
           "TrainResult", "Trainer", "train"]
