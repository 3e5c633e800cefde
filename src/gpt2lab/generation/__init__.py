"""Text generation: the :class:`Generator`, its continuous-batching :class:`Engine`, beam search."""

from .engine import Engine, fit_prompt
from .generator import Generator, generate_text, load
from .outputs import Completion, RequestOutput, TokenLogprob

__all__ = ["Generator", "load", "generate_text", "Engine", "fit_prompt", "Completion", "RequestOutput",
           "TokenLogprob"]
