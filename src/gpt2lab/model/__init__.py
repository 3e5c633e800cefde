"""The GPT-2 model: config, modules and the static KV cache."""

from .fast import PackedLinear, optimize_for_inference
from .gpt2 import GPT2, ConfigError, GPT2Config, InferenceOnlyError, KVCache

__all__ = ["GPT2", "GPT2Config", "ConfigError", "InferenceOnlyError", "KVCache", "PackedLinear",
           "optimize_for_inference"]
