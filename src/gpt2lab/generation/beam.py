"""Beam search for one prompt in one call, token-identical to ``transformers`` ``generate(num_beams=...)``.

Beam search is not a loop of its own: a beam request's beams are rows of the engine's running batch,
advanced by the engine's step like every other sequence, and selected step for step as transformers'
``GenerationMixin._beam_search`` does (:mod:`gpt2lab.generation.beam_scorer`, where the algorithm is
described). :func:`beam_search` runs one such request alone through a :class:`~.runner.Runner`;
``Generator.generate(..., num_beams=k)``, the CLI and the server add beam requests to their batches.
"""

from __future__ import annotations

from ..model import GPT2
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .engine import Engine
from .outputs import Completion
from .runner import Runner


def beam_search(model: GPT2, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                prompt: str = "", eos_token_id: int | None = None) -> list[Completion]:
    """The ``params.n`` best of ``params.num_beams`` beams for one prompt, best first.

    ``eos_token_id``: the token that ends a beam besides ``params.stop_token_ids`` (default: the
    tokenizer's EOS). Raises ``ValueError`` naming the field for a request that cannot run on this model,
    and :class:`gpt2lab.errors.GenerationFailed` when the search fails (NaN scores, every token masked).
    Uses (and overwrites) the model's KV cache: do not interleave with a running :class:`Engine`.
    """
    runner = Runner(Engine(model, tokenizer, max_batch=params.num_beams, eos_token_id=eos_token_id))
    request_id = runner.add(prompt_ids, params, prompt=prompt)
    runner.run()
    return runner.completions(request_id)
