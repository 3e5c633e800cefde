"""The GPT-2 model: config, modules, the static KV cache and weight-only quantization.

How a forward runs (eager PyTorch, gpt2lab's C kernels, CUDA graphs) is decided in :mod:`gpt2lab.runtime`;
the kernels themselves are :mod:`gpt2lab.kernels`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ..placement import QUANTIZATIONS, check_quantization  # the vocabulary's, re-exported for old imports
from .compat import optimize_for_inference
from .gpt2 import GPT2, ConfigError, GPT2Config, InferenceOnlyError, KVCache
from .quantize import QuantizedEmbedding, QuantizedLinear

__all__ = ["GPT2", "GPT2Config", "ConfigError", "InferenceOnlyError", "KVCache", "optimize_for_inference",
           "QUANTIZATIONS", "QuantizedLinear", "QuantizedEmbedding", "check_quantization"]

# names that moved out of this package: old name -> (new module, attribute; None: the module itself)
_MOVED = {
    "inference_runner": ("gpt2lab.runtime", "inference_runner"),
    "KernelRunner": ("gpt2lab.runtime", "KernelRunner"),
    "kernels": ("gpt2lab.kernels", None),
}


def __getattr__(name: str) -> Any:
    """The moved names, still importable from here with a DeprecationWarning naming their new home."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _MOVED[name]
    new = f"{module}.{attribute}" if attribute else module
    warnings.warn(f"gpt2lab.model.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
    # gpt2lab.runtime sits above the model: importing it from here is the one upward import of this package,
    # deliberate, made only when old code asks for a moved name (never at import time)
    value = importlib.import_module(module)
    return getattr(value, attribute) if attribute else value
