"""The parameter explorer: sample every combination of a temperature x top-k x top-p grid, then score
each setting for coherence (perplexity of its samples under a model, repetition) and creativity
(distinct-n, self-BLEU), and report it as a table, CSV/JSON, a scatter plot and an HTML page.

Every setting runs in one continuous-batching engine at once: sampling parameters are per row, so the
whole grid shares the batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from .common import ModelLike, as_generator, progress_bar
from .report import METRICS, SETTING_FIELDS, ExploreResult, Sample, Setting, SettingResult, write_outputs
from .scoring import perplexity_of
from .text import diversity_metrics, repeated_ngram_rate, score_continuations

DEFAULT_TEMPERATURES = (0.3, 0.7, 1.0, 1.3)
DEFAULT_TOP_KS = (0, 10, 50)
DEFAULT_TOP_PS = (1.0, 0.9)
__all__ = ["DEFAULT_TEMPERATURES", "DEFAULT_TOP_KS", "DEFAULT_TOP_PS", "METRICS", "SETTING_FIELDS", "ExploreResult",
           "Sample", "Setting", "SettingResult", "explore", "grid"]
def grid(temperatures: Sequence[float] = DEFAULT_TEMPERATURES, top_ks: Sequence[int] = DEFAULT_TOP_KS,
         top_ps: Sequence[float] = DEFAULT_TOP_PS) -> list[Setting]:
    """Every combination, each value validated as :class:`SamplingParams` would (duplicates dropped)."""
    from ..sampling import SamplingParams

    for name, values in (("temperature", temperatures), ("top_k", top_ks), ("top_p", top_ps)):
        if not values:
            raise ValueError(f"{name}: give at least one value")
    settings = []
    for t, k, p in itertools.product(temperatures, top_ks, top_ps):
        SamplingParams(temperature=t, top_k=k, top_p=p)  # raises ValueError naming the parameter
        setting = Setting(float(t), int(k), float(p))
        if setting not in settings:
            settings.append(setting)
    return settings


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def explore(prompts: str | Sequence[str], model: ModelLike = None, *,
            temperatures: Sequence[float] = DEFAULT_TEMPERATURES, top_ks: Sequence[int] = DEFAULT_TOP_KS,
            top_ps: Sequence[float] = DEFAULT_TOP_PS, max_length: int = 60, samples: int = 8, seed: int | None = 0,
            scoring_model: ModelLike = None, out: str | Path | None = None, max_batch: int = 32,
            progress: bool = False, device: str = "auto") -> ExploreResult:
    """Generate ``samples`` completions per prompt for every grid setting and score each setting.

    ``max_length`` counts prompt + new tokens (as the seed's ``generate_text`` and ``transformers``
    do). ``seed``: every setting samples with the same seed, so settings differ only by their
    parameters. ``scoring_model``: the model whose perplexity measures coherence (default: the
    generating model). ``out``: a directory to write results.csv, results.json, plot.png and
    report.html into (see :func:`write_outputs`).
    """
    from ..sampling import SamplingParams

    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("give at least one prompt")
    if not isinstance(samples, int) or not 1 <= samples <= 128:
        raise ValueError(f"samples must be an integer in [1, 128], got {samples!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    settings = grid(temperatures, top_ks, top_ps)
    gen = as_generator(model, device)
    scorer = gen if scoring_model is None else as_generator(scoring_model, device)
    encoded = [gen.encode_prompt(p) for p in prompt_list]

    total = len(settings) * len(prompt_list) * samples
    runner = gen.runner(max_batch=min(max_batch, total))
    for s, setting in enumerate(settings):  # every request is checked before any work starts
        params = SamplingParams(temperature=setting.temperature, top_k=setting.top_k, top_p=setting.top_p,
                                max_length=max_length, n=samples, seed=seed)
        for p, ids in enumerate(encoded):
            runner.add(ids, params, request_id=f"{s}/{p}", source=f"setting/prompt {s}/{p}")
    with progress_bar(total, "sampling", progress) as advance:
        runner.run(lambda out: advance(1) if out.finished else None)
    completions = {(s, p): runner.completions(f"{s}/{p}") for s in range(len(settings))
                   for p in range(len(prompt_list))}

    # (setting, prompt, sample) in order; one batched scoring pass over all of them
    keys = [(s, p, j) for s in range(len(settings)) for p in range(len(prompt_list)) for j in range(samples)]
    ids = [completions[(s, p)][j].token_ids for s, p, j in keys]
    texts = [completions[(s, p)][j].text for s, p, j in keys]
    if scorer is gen:
        scored = score_continuations(gen, [encoded[p] for _, p, _ in keys], ids, progress=progress)
    else:  # another tokenizer, perhaps: score the text
        prompts_ids = [scorer.encode_prompt(prompt) for prompt in prompt_list]
        scored = score_continuations(scorer, [prompts_ids[p] for _, p, _ in keys],
                                     scorer.tokenizer.encode_batch(texts), progress=progress)

    results = []
    for s, setting in enumerate(settings):
        mine = [i for i, key in enumerate(keys) if key[0] == s]
        nll, count = sum(scored["nlls"][i] for i in mine), sum(scored["counts"][i] for i in mine)
        # diversity compares the samples of one prompt with each other, then averages over prompts
        per_prompt = [diversity_metrics([texts[i] for i in mine if keys[i][1] == p]) for p in range(len(prompt_list))]
        results.append(SettingResult(
            setting=setting,
            perplexity=perplexity_of(nll, count),
            repeated_4gram_rate=repeated_ngram_rate([texts[i] for i in mine], 4),
            **{m: _mean([d[m] for d in per_prompt]) for m in ("distinct_1", "distinct_2", "distinct_3", "self_bleu",
                                                               "mean_length")},
            mean_tokens=sum(len(ids[i]) for i in mine) / len(mine),
            samples=[Sample(prompt=prompt_list[keys[i][1]], text=texts[i], tokens=len(ids[i]),
                            perplexity=perplexity_of(scored["nlls"][i], scored["counts"][i])) for i in mine]))
    result = ExploreResult(model=gen.name, scoring_model=scorer.name, prompts=prompt_list, max_length=max_length,
                           samples=samples, seed=seed, settings=results)
    if out is not None:
        write_outputs(result, out)
    return result


