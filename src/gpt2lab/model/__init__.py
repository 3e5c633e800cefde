"""The GPT-2 model: config, modules and the static KV cache."""

from .gpt2 import GPT2, ConfigError, GPT2Config, KVCache

__all__ = ["GPT2", "GPT2Config", "ConfigError", "KVCache"]
