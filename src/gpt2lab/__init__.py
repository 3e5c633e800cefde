"""gpt2lab: explore, control, fine-tune, evaluate and serve GPT-2-family text generation.

Importing ``gpt2lab`` is cheap: torch and everything heavy load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

__version__ = "0.1.0"

if TYPE_CHECKING:
    from . import evaluation as evaluate
    from .generation import Generator, generate_text, load

_LAZY = {
    "load": ("gpt2lab.generation", "load"),
    "Generator": ("gpt2lab.generation", "Generator"),
    "generate_text": ("gpt2lab.generation", "generate_text"),
    "evaluate": ("gpt2lab.evaluation", None),  # the module: gpt2lab.evaluate.perplexity(...)
}

__all__ = ["__version__", "load", "Generator", "generate_text", "evaluate"]


__getattr__ = lazy_getattr(__name__, _LAZY)
