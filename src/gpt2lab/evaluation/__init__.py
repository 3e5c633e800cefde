"""Evaluation: sliding-window perplexity, text metrics, and the sampling-parameter explorer.

``perplexity(...)``, ``text_metrics(...)`` and ``explore(...)`` are what the ``gpt2lab eval`` and
``gpt2lab explore`` commands call. Heavy libraries (torch, sacrebleu, matplotlib) load on first use.
"""

from .explore import ExploreResult, Setting, SettingResult, explore, grid
from .perplexity import DocumentPerplexity, PerplexityResult, perplexity
from .text import (
    bleu,
    chrf,
    distinct_n,
    diversity_metrics,
    read_predictions,
    read_references,
    repeated_ngram_rate,
    rouge,
    self_bleu,
    text_metrics,
    text_perplexity,
)

__all__ = ["explore", "grid", "ExploreResult", "Setting", "SettingResult", "perplexity", "PerplexityResult",
           "DocumentPerplexity", "text_metrics", "text_perplexity", "bleu", "chrf", "rouge", "distinct_n",
           "self_bleu", "repeated_ngram_rate", "diversity_metrics", "read_predictions", "read_references"]
