"""Sampling: generation controls (:class:`SamplingParams`) and the logits transforms.

``SamplingParams`` imports nothing heavy; the torch-based names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .params import SamplingParams

if TYPE_CHECKING:
    from .pipeline import LogitsPipeline, bad_words_ids, sample
    from .transforms import (
        BadWords,
        LogitBias,
        LogitsTransform,
        MinP,
        MinTokens,
        NoRepeatNGram,
        PresenceFrequencyPenalty,
        RepetitionPenalty,
        Temperature,
        TopK,
        TopP,
        TypicalP,
    )

__all__ = [
    "SamplingParams", "LogitsPipeline", "sample", "bad_words_ids",
    "LogitsTransform", "LogitBias", "BadWords", "RepetitionPenalty", "PresenceFrequencyPenalty",
    "NoRepeatNGram", "Temperature", "TopK", "TopP", "MinP", "TypicalP", "MinTokens",
]
_PIPELINE = {"LogitsPipeline", "sample", "bad_words_ids"}
_LAZY = {name: "pipeline" if name in _PIPELINE else "transforms" for name in __all__[1:]}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
