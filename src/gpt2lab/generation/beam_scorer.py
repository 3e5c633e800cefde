"""The selection step of one beam request, step for step the algorithm of ``transformers`` ``generate``.

The beams of a request are ``num_beams`` rows of the engine's running batch (see
:mod:`gpt2lab.generation.engine`): every step's one decode forward gives their next-token logits along
with every other row's, and :meth:`BeamSearch.step` then does what one iteration of
``GenerationMixin._beam_search`` (transformers >= 4.50, vectorised version) does, so that the same weights
give the same tokens: keep the ``(1 + #eos) * num_beams`` best continuations (at least ``2 * num_beams``),
retire those that end in EOS (or reach the length limit) among the top ``num_beams`` into the finished set
scored ``sum_logprobs / new_len ** length_penalty`` (ranked in log space, :func:`_rank_keys`), continue with
the best ``num_beams`` that did not finish, and stop when the finished set cannot improve
(``early_stopping=False``: the best running beam at its current length cannot beat the worst finished one;
``True``: as soon as ``num_beams`` hypotheses finished) or at the length limit. The engine then moves its
rows' KV cache as :attr:`BeamSearch.reorder` says (new beam ``i`` continues old beam ``reorder[i]``), as
transformers' ``_reorder_cache`` does.

Beam search is deterministic: temperature and the sampling filters are ignored; the logits processors
(logit_bias, bad_words, penalties, no_repeat_ngram, min_tokens) apply to the log-probabilities, as in
``transformers``; padded embedding rows (ids the tokenizer cannot decode) are never chosen. Stop strings
cut the returned text (the search itself ends at EOS / stop tokens); the text, its finish reason and its
logprobs come from :class:`~.stopping.SequenceText` as for sampled sequences
(``include_stop_str_in_output``, ``skip_special_tokens``, ``min_tokens``).
"""

from __future__ import annotations

import math

import torch

from ..model import GPT2
from ..sampling import LogitsPipeline, SamplingParams
from ..sampling.pipeline import ALL_MASKED_ERROR, NAN_SCORES_ERROR
from ..tokenizer import Tokenizer
from .outputs import RequestOutput, TokenLogprob, token_logprobs
from .stopping import SequenceText

_NEG = -1.0e9  # transformers' "impossible" score
_LOG_CAP = 1.0e6  # |log| of a length-penalised score beyond which only its sign is kept (ties; never overflow)


def _rank_keys(scores: torch.Tensor, length: int, length_penalty: float) -> torch.Tensor:
    """Float64 keys in the order of ``scores / length ** length_penalty`` (transformers' finished-beam score),
    computed in log space so that no finite ``length_penalty`` overflows (``2 ** 1000.0`` raises
    OverflowError) or underflows to a tie between different lengths: ``log |score|`` (clamped to
    ``+-_LOG_CAP``) placed above ``3 * _LOG_CAP`` for positive scores (logit_bias can make them positive),
    below ``-3 * _LOG_CAP`` (mirrored) for negative ones, 0 for 0. ``-inf`` scores get ``-inf``."""
    s = scores.double()
    log_mag = torch.log(s.abs()) - length_penalty * math.log(length)  # python float: inf, never an error
    log_mag = torch.nan_to_num(log_mag, nan=0.0).clamp(-_LOG_CAP, _LOG_CAP)
    keys = torch.where(s > 0, 3 * _LOG_CAP + log_mag, -(3 * _LOG_CAP + log_mag))
    keys = torch.where(s == 0, torch.zeros_like(keys), keys)
    return torch.where(torch.isneginf(s), torch.full_like(keys, -math.inf), keys)


class BeamSearch:
    """The search state of one beam request whose ``num_beams`` beams decode as rows of a batch.

    ``prompt_ids`` (``L`` tokens) and ``budget`` (new tokens at most) are the fitted request; ``decodable``
    is the number of token ids the tokenizer can decode (logits past it are never chosen). After each
    :meth:`step` that returns False, :attr:`next_tokens` are the tokens the beams feed next (at position
    :attr:`cached`) and :attr:`reorder` (a tensor) says which old beam each new beam continues
    (:attr:`reordered`: not the identity).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int, tokenizer: Tokenizer,
                 decodable: int, eos_token_id: int | None, device: torch.device) -> None:
        self.prompt_ids, self.params, self.tokenizer = prompt_ids, params, tokenizer
        self.eos_token_id, self.decodable, self.device = eos_token_id, decodable, device
        num_beams, L = params.num_beams, len(prompt_ids)
        eos_ids = list(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            eos_ids.append(eos_token_id)
        self._eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self._max_length = L + budget
        self._keep = max(2, 1 + len(self._eos)) * num_beams
        self._top_mask = torch.arange(self._keep, device=device) < num_beams
        # processors only: no warpers in beam search
        self._pipeline = LogitsPipeline([params.with_(temperature=0.0)] * num_beams, decodable, tokenizer=tokenizer,
                                        device=device, eos_token_id=eos_token_id)
        self._running = torch.full((num_beams, self._max_length), eos_ids[0] if eos_ids else 0, dtype=torch.long,
                                   device=device)
        self._running[:, :L] = torch.tensor(prompt_ids, device=device)
        self._running_scores = torch.zeros(num_beams, device=device)
        self._running_scores[1:] = _NEG  # only beam 0 is real at the start: the others would duplicate it
        self._finished = self._running.clone()
        # rank keys (see _rank_keys), not the scores themselves: -inf is "no hypothesis"
        self._finished_scores = torch.full((num_beams,), -math.inf, dtype=torch.float64, device=device)
        self._finished_lens = torch.zeros(num_beams, dtype=torch.long, device=device)
        self._is_finished = torch.zeros(num_beams, dtype=torch.bool, device=device)
        self._improvable = True
        self.cur_len = L  # tokens of each running beam, prompt included
        self.reorder = torch.zeros(num_beams, dtype=torch.long, device=device)
        self.reordered = True  # whether reorder is not the identity
        self.next_tokens: list[int] = []

    @property
    def cached(self) -> int:
        """Tokens of each beam already in its KV cache row (all but the one it feeds next)."""
        return self.cur_len - 1

    def step(self, logits: torch.Tensor) -> bool:
        """One selection step on the beams' next-token ``logits [num_beams, V]`` (row ``i``: beam ``i``);
        True when the search is over (then :meth:`outputs`). Raises ``ValueError`` when the scores are NaN or
        every beam has every token masked (transformers would return garbage or no tokens)."""
        num_beams, L, cur_len = self.params.num_beams, len(self.prompt_ids), self.cur_len
        running, running_scores = self._running, self._running_scores
        log_probs = torch.log_softmax(logits[:, :self.decodable].float(), dim=-1)
        if self._pipeline.processors:
            log_probs = self._pipeline(log_probs, running[:, :cur_len].tolist(), [L] * num_beams)
        vocab = log_probs.shape[-1]
        acc = (log_probs + running_scores[:, None]).reshape(-1)
        topk_scores, topk_idx = torch.topk(acc, k=self._keep)
        best_score = float(topk_scores[0])  # topk ranks NaN first: one value tells
        if math.isnan(best_score):
            raise ValueError(NAN_SCORES_ERROR)
        if best_score == float("-inf"):
            raise ValueError(ALL_MASKED_ERROR)
        source = topk_idx // vocab
        tokens = topk_idx % vocab
        cand = running[source]
        cand[:, cur_len] = tokens
        hits = torch.isin(tokens, self._eos) | (cur_len + 1 >= self._max_length)

        # the best num_beams candidates that go on
        run_scores = topk_scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(run_scores, k=num_beams)[1]
        self._running, self._running_scores, self.reorder = cand[nxt], run_scores[nxt], source[nxt]

        # candidates among the top num_beams that just finished join the finished set if good enough
        just = hits & self._top_mask
        early = self.params.early_stopping is True
        eligible = just & torch.isfinite(topk_scores)
        if (early and bool(self._is_finished.all())) or not self._improvable:
            eligible = torch.zeros_like(eligible)
        fin = torch.where(eligible, _rank_keys(topk_scores, cur_len + 1 - L, self.params.length_penalty),
                          -math.inf)
        merged_scores = torch.cat((self._finished_scores, fin))
        best = torch.topk(merged_scores, k=num_beams)[1]
        self._finished = torch.cat((self._finished, cand))[best]
        self._finished_scores = merged_scores[best]
        self._finished_lens = torch.cat((self._finished_lens,
                                         torch.full((self._keep,), cur_len + 1 - L, device=self.device)))[best]
        self._is_finished = torch.cat((self._is_finished, eligible))[best]

        self.cur_len = cur_len = cur_len + 1
        best_running = _rank_keys(self._running_scores[:1], cur_len - L, self.params.length_penalty)
        worst_finished = torch.where(self._is_finished, self._finished_scores.min(), -math.inf)
        self._improvable = self._improvable and bool((best_running > worst_finished).any())
        if not self._improvable or (early and bool(self._is_finished.all())) or bool(hits.all()):
            return True
        # one read back for both: the engine skips moving the cache when no beam changed places
        reorder, self.next_tokens = torch.stack((self.reorder, self._running[:, cur_len - 1])).tolist()
        self.reordered = reorder != list(range(num_beams))
        return False

    def outputs(self, model: GPT2, request_id: str,
                prompt_logprobs: list[TokenLogprob] | None) -> list[RequestOutput]:
        """The ``params.n`` best finished beams, best first, each as its sequence's one and last output
        (each with ``prompt_logprobs``, as a request's samples all carry them). Logprobs (when asked for) are
        the raw model distribution's, from one plain forward of each beam (``model``'s PyTorch code; the KV cache
        untouched)."""
        params, L = self.params, len(self.prompt_ids)
        results = []
        for i in range(params.n):
            ids = self._finished[i, L:L + int(self._finished_lens[i])].tolist()
            entries: list = [None] * len(ids)
            if params.logprobs is not None and ids:
                full = torch.tensor([self.prompt_ids + ids], device=self.device)
                lp = torch.log_softmax(model(full)[0, L - 1:-1, :self.decodable].float(), dim=-1)
                entries = token_logprobs(lp, ids, params.logprobs, self.tokenizer)
            out = SequenceText(self.tokenizer, params, self.eos_token_id)
            text, logprobs, reason = "", [], None
            for token, entry in zip(ids, entries):
                delta, released, reason = out.push(token, entry)
                text, logprobs = text + delta, logprobs + released
                if reason is not None:
                    break
            if reason is None:
                delta, released = out.finish()
                text, logprobs, reason = text + delta, logprobs + released, "length"
            results.append(RequestOutput(request_id, i, ids, text, True, reason,
                                         logprobs if params.logprobs is not None else None,
                                         prompt_logprobs))
        return results
