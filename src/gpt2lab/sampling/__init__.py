"""Sampling: generation controls (:class:`SamplingParams`) and the logits transforms."""

from .params import SamplingParams

__all__ = ["SamplingParams"]
