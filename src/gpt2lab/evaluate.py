"""``gpt2lab.evaluate``: another name for :mod:`gpt2lab.evaluation`, the same module object, so that
``from gpt2lab.evaluate import perplexity`` works as ``gpt2lab.evaluate.perplexity(...)`` does."""

import sys

from . import evaluation

sys.modules[__name__] = evaluation
