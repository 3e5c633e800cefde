"""``transformers``' generation argument names as aliases of ours: the one mapping, used for keyword
arguments, ``generation_config=`` objects and a checkpoint's ``generation_config.json``.

Fields are taken from ``transformers.GenerationConfig``; each is listed here with what it becomes:

- same name and meaning: ``max_new_tokens``, ``max_length``, ``temperature``, ``top_k``, ``top_p``,
  ``min_p``, ``typical_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``,
  ``length_penalty``, ``early_stopping`` (``"never"`` becomes ``False``), ``bad_words_ids``;
- renamed: ``num_return_sequences`` -> ``n``, ``min_new_tokens`` -> ``min_tokens``;
- ``do_sample=False`` -> ``temperature=0`` (greedy; beam search when ``num_beams > 1``);
  ``do_sample=True`` lets a lower layer's greedy default go (temperature 1.0 unless one is given);
- ``eos_token_id`` (an id or a list) -> ``stop_token_ids`` (ids other than the tokenizer's EOS, which
  stops anyway);
- accepted and without effect here: ``pad_token_id`` (gpt2lab never pads), ``bos_token_id``,
  ``decoder_start_token_id``, ``use_cache``, ``transformers_version``, ``_from_model_config``, and what
  only changes what transformers returns or how it computes (``output_scores``, ``output_attentions``,
  ``return_dict_in_generate``, ``cache_implementation``, ...).

Other ``GenerationConfig`` fields in a ``generation_config.json`` or a ``generation_config=`` object
(``min_length``, ``diversity_penalty``, ...) are ignored with one :class:`GenerationConfigWarning` naming
them (unless they hold the value that turns them off: ``min_length: 0``, ``num_beam_groups: 1``, null, ...),
as transformers ignores flags it cannot use; as keyword arguments they raise ``TypeError`` like
any unknown name (a misspelt argument is an error, not a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ..errors import GPT2LabWarning


class GenerationConfigWarning(GPT2LabWarning):
    """Fields of a generation config (a ``generation_config.json`` or a ``generation_config=`` object) that
    gpt2lab does not use and ignores."""

# transformers name -> ours, same meaning
RENAMED = {"num_return_sequences": "n", "min_new_tokens": "min_tokens"}
SAME = ("max_new_tokens", "max_length", "temperature", "top_k", "top_p", "min_p", "typical_p",
        "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping",
        "bad_words_ids")
CONVERTED = ("do_sample", "eos_token_id")
NO_EFFECT = ("pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "transformers_version",
             "_from_model_config",
             # what transformers returns or how it computes, not which tokens it picks
             "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
             "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
             "low_memory", "prefill_chunk_size")
# other GenerationConfig fields at the value that turns them off: nothing to warn about
OFF_VALUES = {"min_length": 0, "num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
              "encoder_no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "guidance_scale": 1.0}
# every transformers name this module understands
HF_NAMES = (*RENAMED, *SAME, *CONVERTED, *NO_EFFECT)
ALIASES = (*RENAMED, *CONVERTED, *NO_EFFECT)  # the ones that are not also our own names
_LENGTH = ("max_new_tokens", "max_length")


def as_dict(generation_config: Any) -> dict[str, Any]:
    """A ``transformers.GenerationConfig`` (the fields set on it: ``to_diff_dict()``) or a mapping, as a dict."""
    if generation_config is None:
        return {}
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    if hasattr(generation_config, "to_diff_dict"):
        return dict(generation_config.to_diff_dict())
    raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, "
                    f"got {type(generation_config).__name__}")


def _ids(name: str, value: Any) -> list[int]:
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in ids):
        raise ValueError(f"{name} must be a token id or a list of token ids >= 0, got {value!r}")
    return list(ids)


def translate(settings: Mapping[str, Any], *, eos_token_id: int | None = None,
              strict: bool = True, source: str = "generation settings", warn: bool = False) -> dict[str, Any]:
    """``settings`` in transformers' and/or gpt2lab's names -> :class:`SamplingParams` keyword arguments.

    ``eos_token_id``: the tokenizer's EOS (not repeated as a stop id). ``strict``: names neither ours
    nor in the mapping raise ``TypeError`` (keyword arguments); otherwise they are skipped, as a
    generation config's are (it may hold fields gpt2lab has no use for), and when both lengths are
    given ``max_new_tokens`` wins over ``max_length`` (transformers' rule). ``warn``: skipped fields
    are named in one :class:`GenerationConfigWarning` (from ``source``). A transformers name and our
    name for the same control given together raise ``TypeError``.
    """
    from .params import SamplingParams

    ours = set(SamplingParams.field_names())
    out: dict[str, Any] = {}
    unknown = []
    for key, value in settings.items():
        if key in RENAMED:
            target = RENAMED[key]
            if target in settings:
                raise TypeError(f"{source}: give {key} or {target}, not both")
            out[target] = value
        elif key == "do_sample":
            if not isinstance(value, bool):
                raise ValueError(f"{source}: do_sample must be true or false, got {value!r}")
            if not value:
                out["temperature"] = 0.0
            elif settings.get("temperature") is None:
                out["_sample"] = True  # resolved by merge(): a greedy default below is lifted
        elif key == "eos_token_id":
            if value is not None:
                extra = [t for t in _ids("eos_token_id", value) if t != eos_token_id]
                if extra:
                    out["stop_token_ids"] = list(dict.fromkeys([*settings.get("stop_token_ids", []), *extra]))
        elif key == "early_stopping" and value == "never":
            out[key] = False
        elif key in NO_EFFECT:
            continue
        elif key in ours:
            if key == "temperature" and settings.get("do_sample") is False:
                continue  # transformers ignores temperature when not sampling
            if key == "stop_token_ids" and "stop_token_ids" in out:
                continue  # already merged with eos_token_id above
            out[key] = value
        else:
            unknown.append(key)
    if unknown and strict:
        raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(SamplingParams.field_names())} and transformers' {', '.join(ALIASES)}")
    ignored = [k for k in unknown if settings[k] not in (None, False, [], {}) and OFF_VALUES.get(k, ...) != settings[k]]
    if ignored and warn:
        # repr: a file's field names are shown as written, control characters escaped
        warnings.warn(f"{source}: ignoring field(s) gpt2lab does not use: {', '.join(map(repr, sorted(ignored)))}",
                      GenerationConfigWarning, stacklevel=3)
    if out.get("max_new_tokens") is not None and "max_length" in out and not strict:
        del out["max_length"]  # transformers: max_new_tokens wins over a config's max_length
    return {k: v for k, v in out.items() if v is not None or k in _LENGTH}


def merge(defaults: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    """Translated ``defaults`` (a checkpoint's generation config) overridden by translated ``explicit``
    arguments. Giving either length (``max_new_tokens`` / ``max_length``) replaces both defaults."""
    merged = dict(defaults)
    merged.pop("_sample", None)
    if any(explicit.get(k) is not None for k in _LENGTH):
        for k in _LENGTH:
            merged.pop(k, None)
    for key, value in explicit.items():
        if key != "_sample":
            merged[key] = value
    if explicit.get("_sample") and merged.get("temperature") == 0 and "temperature" not in explicit:
        merged["temperature"] = 1.0  # do_sample=True over a greedy default
    return {k: v for k, v in merged.items() if v is not None}
