"""Text generation: the :class:`Generator` and its decoding engine."""

from .generator import Generator, load

__all__ = ["Generator", "load"]
