"""Text generation: the :class:`Generator`, its continuous-batching :class:`Engine` (beam search included)
and the :class:`Runner` that drives an engine for one caller."""

from .engine import Engine, fit_prompt
from .generator import Generator, generate_text, load
from .outputs import Completion, RequestOutput, TokenLogprob
from .runner import Runner, StepOutputs, max_batch_for

__all__ = ["Generator", "load", "generate_text", "Engine", "Runner", "StepOutputs", "max_batch_for", "fit_prompt",
           "Completion", "RequestOutput", "TokenLogprob"]
