"""The GPT-2 model: config, modules and the static KV cache."""

from . import kernels
from .fast import Decoder, KernelLinear, PackedLinear, optimize_for_inference
from .gpt2 import GPT2, ConfigError, GPT2Config, InferenceOnlyError, KVCache

__all__ = ["GPT2", "GPT2Config", "ConfigError", "InferenceOnlyError", "KVCache", "PackedLinear",
           "KernelLinear", "Decoder", "kernels", "optimize_for_inference"]
