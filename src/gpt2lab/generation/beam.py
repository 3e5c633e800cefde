"""Beam search over the static KV cache, step for step the algorithm of ``transformers`` ``generate``.

It follows ``GenerationMixin._beam_search`` (transformers >= 4.50, vectorised version) so that the same
weights give the same tokens: keep the ``(1 + #eos) * num_beams`` best continuations (at least
``2 * num_beams``), retire those that end in EOS (or reach the length limit) among the top
``num_beams`` into the finished set scored ``sum_logprobs / new_len ** length_penalty``, continue with
the best ``num_beams`` that did not finish, and stop when the finished set cannot improve
(``early_stopping=False``: the best running beam at its current length cannot beat the worst finished
one; ``True``: as soon as ``num_beams`` hypotheses finished) or at the length limit.

Beam search is deterministic: temperature and the sampling filters are ignored; the logits
processors (logit_bias, bad_words, penalties, no_repeat_ngram) apply to the log-probabilities, as in
``transformers``. Stop strings cut the returned text (the search itself ends at EOS / stop tokens);
the text, its finish reason and its logprobs come from :class:`~.stopping.SequenceText` as in the
batching engine (``include_stop_str_in_output``, ``skip_special_tokens``, ``min_tokens``).
"""

from __future__ import annotations

import torch

from .. import runtime
from ..model import GPT2
from ..sampling import LogitsPipeline, SamplingParams
from ..sampling.pipeline import ALL_MASKED_ERROR, NAN_SCORES_ERROR
from ..tokenizer import Tokenizer
from .engine import fit_prompt
from .outputs import Completion, token_logprobs
from .stopping import SequenceText

_NEG = -1.0e9  # transformers' "impossible" score


def _ensure_cache(model: GPT2, rows: int, seq_len: int) -> None:
    model.setup_cache(max(rows, model.max_batch), max(seq_len, model.max_seq))


@torch.inference_mode()
def beam_search(model: GPT2, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                prompt: str = "", eos_token_id: int | None = None) -> list[Completion]:
    """The ``params.n`` best of ``params.num_beams`` beams for one prompt, best first.

    Uses (and overwrites) the model's KV cache: do not interleave with a running :class:`Engine`.
    """
    prompt_ids, budget = fit_prompt(list(prompt_ids), params, model.config.n_positions)
    num_beams, L = params.num_beams, len(prompt_ids)
    if budget == 0:
        return [Completion("", [], "length", [] if params.logprobs is not None else None, prompt, i)
                for i in range(params.n)]
    eos_ids = list(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        eos_ids.append(eos_token_id)
    dev = model.wte.weight.device
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    max_length = L + budget
    keep = max(2, 1 + len(eos)) * num_beams
    top_mask = torch.arange(keep, device=dev) < num_beams
    greedy = params.with_(temperature=0.0)  # processors only: no warpers in beam search
    decodable = min(tokenizer.vocab_size, model.config.vocab_size)  # padded embedding rows are never chosen
    pipeline = LogitsPipeline([greedy] * num_beams, decodable, tokenizer=tokenizer, device=dev,
                              eos_token_id=eos_token_id)
    use_pipeline = bool(pipeline.processors)
    early_stopping, length_penalty = params.early_stopping, params.length_penalty

    running = torch.full((num_beams, max_length), eos_ids[0] if eos_ids else 0, dtype=torch.long, device=dev)
    running[:, :L] = torch.tensor(prompt_ids, device=dev)
    running_scores = torch.zeros(num_beams, device=dev)
    running_scores[1:] = _NEG  # only beam 0 is real at the start: the others would duplicate it
    finished = running.clone()
    finished_scores = torch.full((num_beams,), _NEG, device=dev)
    finished_lens = torch.zeros(num_beams, dtype=torch.long, device=dev)
    is_finished = torch.zeros(num_beams, dtype=torch.bool, device=dev)
    improvable = True

    _ensure_cache(model, num_beams, max_length)
    logits = runtime.forward(model, running[:1, :L], input_pos=torch.arange(L, device=dev)[None],
                             logits_index=torch.tensor([L - 1], device=dev))  # one row: the beams all share the prompt
    for cache in model.caches():
        cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=dev), L)
    logits = logits.expand(num_beams, -1)
    cur_len = L
    while True:
        log_probs = torch.log_softmax(logits[:, :decodable].float(), dim=-1)
        if use_pipeline:
            log_probs = pipeline(log_probs, running[:, :cur_len].tolist(), [L] * num_beams)
        vocab = log_probs.shape[-1]
        acc = (log_probs + running_scores[:, None]).reshape(-1)
        topk_scores, topk_idx = torch.topk(acc, k=keep)
        if bool(topk_scores[0].isnan()):  # topk ranks NaN first: one value tells (it returned garbage beams)
            raise ValueError(NAN_SCORES_ERROR)
        if bool(topk_scores[0] == float("-inf")):  # every beam has every token banned: it returned no tokens
            raise ValueError(ALL_MASKED_ERROR)
        source = topk_idx // vocab
        tokens = topk_idx % vocab
        cand = running[source]
        cand[:, cur_len] = tokens
        hits = torch.isin(tokens, eos) | (cur_len + 1 >= max_length)

        # the best num_beams candidates that go on
        run_scores = topk_scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(run_scores, k=num_beams)[1]
        running, running_scores, reorder = cand[nxt], run_scores[nxt], source[nxt]

        # candidates among the top num_beams that just finished join the finished set if good enough
        just = hits & top_mask
        fin = topk_scores / ((cur_len + 1 - L) ** length_penalty)
        fin = fin + float(bool(is_finished.all()) and early_stopping is True) * _NEG
        fin = fin + float(not improvable) * _NEG
        fin = fin + (~just) * _NEG
        merged_scores = torch.cat((finished_scores, fin))
        best = torch.topk(merged_scores, k=num_beams)[1]
        finished = torch.cat((finished, cand))[best]
        finished_scores = merged_scores[best]
        finished_lens = torch.cat((finished_lens, torch.full((keep,), cur_len + 1 - L, device=dev)))[best]
        is_finished = torch.cat((is_finished, just))[best]

        cur_len += 1
        best_running = running_scores[:1] / ((cur_len - L) ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(), torch.tensor(_NEG, device=dev))
        improvable = improvable and bool((best_running > worst_finished).any())
        if not improvable or (bool(is_finished.all()) and early_stopping is True) or bool(hits.all()):
            break
        for cache in model.caches():
            cache.reorder(reorder, cur_len - 1)
        logits = runtime.decode(model, running[:, cur_len - 1], cur_len - 1)  # the tokens stay on the device

    results = []
    for i in range(params.n):
        n_new = int(finished_lens[i])
        ids = finished[i, L:L + n_new].tolist()
        entries: list = [None] * len(ids)
        if params.logprobs is not None and ids:
            full = torch.tensor([prompt_ids + ids], device=dev)
            lp = torch.log_softmax(model(full)[0, L - 1:-1, :decodable].float(), dim=-1)
            entries = token_logprobs(lp, ids, params.logprobs, tokenizer)
        out = SequenceText(tokenizer, params, eos_token_id)
        text, logprobs, reason = "", [], None
        for token, entry in zip(ids, entries):
            delta, released, reason = out.push(token, entry)
            text, logprobs = text + delta, logprobs + released
            if reason is not None:
                break
        if reason is None:
            delta, released = out.finish()
            text, logprobs, reason = text + delta, logprobs + released, "length"
        results.append(Completion(text, ids, reason, logprobs if params.logprobs is not None else None, prompt, i))
    return results
