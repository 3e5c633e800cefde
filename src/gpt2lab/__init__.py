"""gpt2lab: explore, control, fine-tune, evaluate and serve GPT-2-family text generation.

Importing ``gpt2lab`` is cheap: torch and everything heavy load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .generation import Generator, generate_text, load

_LAZY = {
    "load": ("gpt2lab.generation", "load"),
    "Generator": ("gpt2lab.generation", "Generator"),
    "generate_text": ("gpt2lab.generation", "generate_text"),
}

__all__ = ["__version__", "load", "Generator", "generate_text"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
