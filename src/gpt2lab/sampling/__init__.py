"""Sampling: generation controls (:class:`SamplingParams`) and the logits transforms.

``SamplingParams`` imports nothing heavy; the torch-based names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .params import SamplingParams
from .structured import StructuredOutputsParams

if TYPE_CHECKING:
    from .constraint import GrammarState, StructuredOutput
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
    "SamplingParams", "StructuredOutputsParams", "LogitsPipeline", "sample", "bad_words_ids",
    "LogitsTransform", "LogitBias", "BadWords", "RepetitionPenalty", "PresenceFrequencyPenalty",
    "NoRepeatNGram", "Temperature", "TopK", "TopP", "MinP", "TypicalP", "MinTokens",
    "StructuredOutput", "GrammarState",
]
_PIPELINE = {"LogitsPipeline", "sample", "bad_words_ids"}
_CONSTRAINT = {"StructuredOutput", "GrammarState"}
_LAZY = {name: "pipeline" if name in _PIPELINE else "constraint" if name in _CONSTRAINT else "transforms"
         for name in __all__[2:]}


__getattr__ = lazy_getattr(__name__, {name: (f".{module}", name) for name, module in _LAZY.items()})
