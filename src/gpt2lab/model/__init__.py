"""The GPT-2 model: config, modules and the static KV cache."""

from . import kernels
from .fast import KernelRunner, inference_runner, optimize_for_inference
from .gpt2 import GPT2, ConfigError, GPT2Config, InferenceOnlyError, KVCache
from .quantize import QUANTIZATIONS, QuantizedEmbedding, QuantizedLinear, check_quantization

__all__ = ["GPT2", "GPT2Config", "ConfigError", "InferenceOnlyError", "KVCache", "KernelRunner", "kernels",
           "inference_runner", "optimize_for_inference", "QUANTIZATIONS", "QuantizedLinear", "QuantizedEmbedding",
           "check_quantization"]
