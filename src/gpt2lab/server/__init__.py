"""OpenAI-compatible HTTP server with continuous batching, and the browser playground.

Imports FastAPI: only ``gpt2lab serve`` and code that serves import this package.
"""

from .app import create_app
from .state import ModelConfig

__all__ = ["create_app", "ModelConfig"]
