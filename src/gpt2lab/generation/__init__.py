"""Text generation: the :class:`Generator`, its continuous-batching :class:`Engine` (beam search included)
and the :class:`Runner` that drives an engine for one caller.

The names load on first use (PEP 562): importing a module of this package that needs no model, such as
:mod:`.chat_format` or :mod:`.chat_worker` (a chat render worker process), does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:
    from .engine import Engine, fit_prompt
    from .generator import Generator, generate_text, load
    from .outputs import Completion, RequestOutput, TokenLogprob
    from .runner import Runner, StepOutputs, max_batch_for

__all__ = ["Generator", "load", "generate_text", "Engine", "Runner", "StepOutputs", "max_batch_for", "fit_prompt",
           "Completion", "RequestOutput", "TokenLogprob"]

_LAZY = {
    "Engine": (".engine", "Engine"), "fit_prompt": (".engine", "fit_prompt"),
    "Generator": (".generator", "Generator"), "generate_text": (".generator", "generate_text"),
    "load": (".generator", "load"),
    "Completion": (".outputs", "Completion"), "RequestOutput": (".outputs", "RequestOutput"),
    "TokenLogprob": (".outputs", "TokenLogprob"),
    "Runner": (".runner", "Runner"), "StepOutputs": (".runner", "StepOutputs"),
    "max_batch_for": (".runner", "max_batch_for"),
}
__getattr__ = lazy_getattr(__name__, _LAZY)
