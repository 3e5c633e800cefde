"""Batch jobs' generation: many prompts (rows), each seeded by its key, through one :class:`~.runner.Runner`.

``gpt2lab generate`` and the Ray Data jobs of :mod:`gpt2lab.ray` both complete rows here, so a row's
completions depend on the run's parameters, the row's prompt and its key only: the same in one process,
on 1 actor, 4 actors or a cluster. The per-row seed rule is :func:`~.engine.row_seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .engine import row_seed

if TYPE_CHECKING:
    from ..sampling import SamplingParams
    from .generator import Generator
    from .outputs import Completion, TokenLogprob


def row_params(params: SamplingParams, key: int | str) -> SamplingParams:
    """``params`` for row ``key`` of a batch job: its seed replaced by ``row_seed(params.seed, key)`` (unseeded
    parameters are returned as they are). Raises as :func:`~.engine.row_seed` for a bad key."""
    if params.seed is None:
        return params
    return params.with_(seed=row_seed(params.seed, key))


def generate_rows(gen: Generator, prompts: Sequence[str], keys: Sequence[int | str],
                  params: SamplingParams) -> list[list[Completion]]:
    """Each prompt's ``params.n`` completions (or beams), row ``i`` seeded by ``keys[i]`` (:func:`row_params`),
    all in one continuous batch: ``[rows][n]``. Every prompt is checked before any work (``ValueError``
    naming the field); :class:`~gpt2lab.errors.GenerationFailed` names the row when the engine ends one
    with an error."""
    if len(prompts) != len(keys):
        raise ValueError(f"keys has {len(keys)} entries for {len(prompts)} prompts")
    runner = gen.runner(num_beams=params.num_beams)
    for i, (prompt, key) in enumerate(zip(prompts, keys)):
        runner.add(gen.encode_prompt(prompt), row_params(params, key), request_id=str(i), prompt=prompt,
                   source=f"prompt {key}")
    runner.run()
    return [runner.completions(str(i)) for i in range(len(prompts))]


def logprobs_record(logprobs: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    """Token logprobs as JSON-ready dicts (``token_id``, ``token``, ``logprob``, ``top``); None stays None."""
    if logprobs is None:
        return None
    return [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
             "top": [{"token_id": i, "token": s, "logprob": v} for i, s, v in t.top]} for t in logprobs]


def completion_record(model: str, c: Completion) -> dict[str, Any]:
    """The JSON object ``gpt2lab generate --json`` (and ``--out``) writes for one completion."""
    return {"model": model, "prompt": c.prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
            "finish_reason": c.finish_reason, "logprobs": logprobs_record(c.logprobs)}
