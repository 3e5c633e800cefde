"""Continuous batching over the model's static KV cache.

Every running sequence owns one row of the cache; rows ``0..n-1`` are always the running ones (a
finished sequence's row is refilled by moving the last row into it), so a decode step is one forward
over ``rows=slice(0, n)``. Sequences of different lengths share a batch without padding: a row's
token at position ``p`` sits in cache slot ``p`` and each row decodes at its own position. New
requests are admitted between steps with one right-padded prefill of all their prompts, first come
first served (a request that needs more rows than are free waits, and so do the ones behind it).

Each sampled sequence samples with its own ``torch.Generator`` (seeded from the request's seed and the
sample index), so a seeded request gives the same text whether it runs alone or in a batch.

Beam search (``num_beams > 1``) is part of the same step: a beam request takes ``num_beams`` rows (its
prompt prefilled once and the row copied), each step's one decode forward covers sampled rows and beam
rows together, then each beam request does transformers' selection step on its rows' logits
(:class:`~.beam_scorer.BeamSearch`) and moves its rows' KV cache to follow the beams it kept. Its rows
move like any other when others finish; its ``n`` best beams come out, whole, when the search ends.

A request may name a LoRA adapter of the engine's :class:`~gpt2lab.model.multi_lora.LoRABank`: its rows add
that adapter's low-rank products to the base model's in every forward, beside rows of other adapters and
of none (the base weights are read once per step). With a :class:`~.prefix_cache.PrefixCache`, a prompt
starting with a cached prefix (of a recent prompt or a finished sequence, under the same adapter) gets
those keys and values copied into its row and prefills only the rest; the tokens are the same either way.

One request's fault ends only that request. Everything that can be checked against the model is
checked by :meth:`Engine.add_request`, before any work (``ValueError`` naming the field). If a
step still raises in the per-row work (logits transforms, sampling, a beam selection step,
detokenizing) or in a prefill, the rows are retried one request at a time and only the ones that fail
alone end, with ``finish_reason "error"`` and ``RequestOutput.error``; the batch goes on. Only a fault of
the batched decode forward itself (out of memory, a broken model) is not attributable: ``step()`` raises it.

:class:`~.runner.Runner` is the loop that drives an engine for one caller (submit, step, collect).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque

import torch

from .. import runtime
from ..model import GPT2
from ..model.multi_lora import LoRABank, LoRAMapping, lora_hooks
from ..sampling import LogitsPipeline, SamplingParams, sample
from ..sampling.constraint import GrammarState
from ..sampling.pipeline import bad_words_ids
from ..sampling.structured import compiled_matcher
from ..tokenizer import Tokenizer
from .beam_scorer import BeamSearch
from .outputs import RequestOutput, TokenLogprob, token_logprobs
from .prefix_cache import PrefixCache
from .stopping import SequenceText

_CACHE_GRANULE = 256  # cache length grows in steps of this many slots (capped at n_positions)
_PREFILL_TOKENS = 4096  # padded prompt tokens per prefill forward (bounds activation and mask memory)
# prompt tokens whose every position's logits one step computes (prompt logprobs): per prefill forward, it bounds
# memory (4 KB a token per 1000 words of vocabulary: 206 MB for GPT-2's 50257 at 1024 tokens); per step, the
# time the running streams wait (log-softmax and top-n entries over the vocabulary for every position)
_PROMPT_LOGPROBS_TOKENS = 1024


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a request seeded with ``seed`` (sample 0 uses the seed itself)."""
    if index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) % 2**64  # splitmix64: distinct, well-mixed seeds
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def row_seed(seed: int, key: int | str) -> int:
    """Seed of row ``key`` of a batch job seeded with ``seed``: the one rule of ``gpt2lab generate`` (a prompt's
    0-based position in its input), ``gpt2lab augment`` (the source row) and their Ray Data jobs
    (:mod:`gpt2lab.ray`), so a row's text depends on the run's seed and the row's key only, never on the
    process, the actor or the batch that ran it. Row 0 uses the seed itself (a one-prompt run is the library
    call with that seed); a ``str`` key (an id column) is hashed (BLAKE2b, stable across processes and
    machines, unlike ``hash``). Raises ``TypeError`` for another key type, ``ValueError`` for a negative one."""
    if isinstance(key, str):
        key = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    elif isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"a row key must be an int or a str, got {type(key).__name__}")
    elif key < 0:
        raise ValueError(f"a row key must be >= 0, got {key}")
    if key == 0:
        return seed
    # splitmix64 of seed and key, with another multiplier than sample_seed's: row k's seed is not sample k's
    x = (seed + key * 0xD1B54A32D192ED03) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def truncate_prompt_tokens(prompt_ids: list[int], params: SamplingParams, n_positions: int) -> list[int]:
    """The prompt's last ``params.truncate_prompt_tokens`` tokens (vLLM's left truncation; ``-1`` keeps
    the model's context length ``n_positions``); the prompt itself when that is unset or longer."""
    k = params.truncate_prompt_tokens
    if k is None:
        return list(prompt_ids)
    k = n_positions if k == -1 else k
    return list(prompt_ids[-k:]) if len(prompt_ids) > k else list(prompt_ids)


def fit_prompt(prompt_ids: list[int], params: SamplingParams, n_positions: int) -> tuple[list[int], int]:
    """Check that a request fits the context; return the (maybe left-truncated) prompt and its new-token budget.

    ``truncate_prompt_tokens`` applies first; ``truncate_prompt`` then drops the oldest tokens that
    do not fit with the new-token budget. Raises ``ValueError`` when the request cannot fit."""
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    prompt_ids = truncate_prompt_tokens(prompt_ids, params, n_positions)
    budget = params.new_token_budget(len(prompt_ids), n_positions)
    total = len(prompt_ids) + budget
    if total > n_positions:
        what = f"max_length ({params.max_length})" if params.max_length is not None else f"max_new_tokens ({budget})"
        if not params.truncate_prompt or budget >= n_positions:
            hint = "shorten the prompt, lower max_new_tokens / max_length"
            if budget < n_positions:
                hint += ", or set truncate_prompt=True to drop the oldest prompt tokens"
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) with {what} needs {total} positions, more than "
                             f"the model's context n_positions={n_positions}; {hint}")
        prompt_ids = prompt_ids[total - n_positions:]
    return list(prompt_ids), budget


class _Sequence:
    """One sample of one request: its tokens, sampler state and cache row."""

    _uids = itertools.count()
    group = None  # a sampled sequence is its own unit of admission (a beam row belongs to a _BeamGroup)
    width = 1  # cache rows it takes

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 budget: int, tokenizer: Tokenizer, device: torch.device, eos_token_id: int | None,
                 prompt_logprobs: list[TokenLogprob] | None = None, lora: int = -1) -> None:
        self.uid = next(self._uids)  # identifies the batch composition for the cached LogitsPipeline
        self.request_id, self.index, self.params, self.budget = request_id, index, params, budget
        self.lora = lora  # its LoRA adapter's slot (-1: the base model)
        self.ended = False  # it left the engine (its adapter released)
        self.prompt_ids = prompt_ids
        self.max_len = len(prompt_ids) + budget
        self.output_ids: list[int] = []
        self.row = -1
        self.text = SequenceText(tokenizer, params, eos_token_id)
        self.prompt_logprobs = prompt_logprobs  # handed out with the first output, then dropped
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(sample_seed(params.seed, index))
        # structured outputs: this sample's own matcher, advanced as its tokens are drawn
        self.grammar = GrammarState(params.structured_outputs, tokenizer, ignore_eos=params.ignore_eos) \
            if params.structured_outputs is not None else None

    @property
    def rows(self) -> tuple[_Sequence]:
        return (self,)

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """The token this sequence feeds to the next decode step."""
        return self.output_ids[-1]

    @property
    def cached(self) -> int:
        """Tokens already in the KV cache (all but the last sampled one)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


class _BeamRow:
    """One beam of a beam request: a row of the running batch whose token the request's search picks."""

    def __init__(self, group: _BeamGroup, beam: int) -> None:
        self.group, self.beam, self.request_id = group, beam, group.request_id
        self.prompt_ids, self.max_len = group.search.prompt_ids, group.max_len  # the group's one prompt list
        self.lora = group.lora
        self.row = -1

    @property
    def last_token(self) -> int:
        return self.group.search.next_tokens[self.beam]

    @property
    def cached(self) -> int:
        return self.group.search.cached


class _BeamGroup:
    """A beam request: its search (:class:`BeamSearch`) and its ``num_beams`` rows, admitted together."""

    def __init__(self, request_id: str, search: BeamSearch, budget: int,
                 prompt_logprobs: list[TokenLogprob] | None, lora: int = -1) -> None:
        self.request_id, self.search, self.prompt_logprobs = request_id, search, prompt_logprobs
        self.lora, self.ended = lora, False
        self.params = search.params
        self.index = 0  # the index a fault of the whole request is reported under
        self.prompt_ids, self.max_len, self.width = search.prompt_ids, len(search.prompt_ids) + budget, \
            search.params.num_beams
        self.rows = [_BeamRow(self, b) for b in range(self.width)]


def _take(logits: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``logits[index]``: a view when the rows are consecutive (they usually are), else a copy."""
    if index == list(range(index[0], index[0] + len(index))):
        return logits[index[0]:index[0] + len(index)]
    return logits[index]


class _Scoring:
    """A request with no room to generate that asks for its prompt's logprobs (vLLM's ``max_tokens=0`` scoring):
    it takes no row; its prompt is scored when it is admitted, within the step's prompt-logprobs budget."""

    width = 0  # cache rows it takes
    group = None

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, lora: int) -> None:
        self.request_id, self.prompt_ids, self.params, self.lora = request_id, prompt_ids, params, lora
        self.index, self.ended = 0, False


_Unit = _Sequence | _BeamGroup | _Scoring  # what is admitted at once: a sampled sequence, a beam request's rows,
# or a prompt to score
_Row = _Sequence | _BeamRow  # what holds a row of the running batch


def _no_tokens(request_id: str, params: SamplingParams, prompt_logprobs: list[TokenLogprob] | None = None,
               error: str | None = None) -> list[RequestOutput]:
    """The last outputs of a request that generates nothing (no room in the context, or scored only): one per
    sample, finished by ``length`` (``error``: by its error)."""
    return [RequestOutput(request_id, index, [], "", True, "length" if error is None else "error",
                          [] if params.logprobs is not None else None, prompt_logprobs, error)
            for index in range(params.n)]


def _prompt_logprobs_wanted(row: _Row) -> int | None:
    """The ``prompt_logprobs`` a row's request asks for (None: none)."""
    return (row.params if row.group is None else row.group.params).prompt_logprobs


class Engine:
    """Continuous-batching text generation over one model (single-threaded: call from one thread).

    ``lora``: the model's LoRA adapters, which requests may name; ``prefix_cache``: the pool of cached
    prefixes this engine reuses and fills (None: none)."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, max_batch: int = 16, eos_token_id: int | None = None, *,
                 lora: LoRABank | None = None, prefix_cache: PrefixCache | None = None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.eos_token_id = eos_token_id if eos_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id)
        self.device = model.wte.weight.device
        self._decodable = min(tokenizer.vocab_size, model.config.vocab_size)
        self._waiting: deque[_Unit] = deque()
        self._running: list[_Row] = []  # _running[i].row == i
        self._groups: list[_BeamGroup] = []  # the running beam requests (their rows are in _running)
        self._ready: list[RequestOutput] = []  # finished before running (zero budget)
        self._ids = itertools.count()
        self._pipeline_key: tuple[int, ...] = ()
        self._pipeline: LogitsPipeline | None = None
        self.lora = lora
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        self.prefill_tokens = 0  # prompt tokens computed by prefills (those found in the prefix cache are not)

    # -- public API ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        """Rows of the running batch (a beam request counts its ``num_beams`` rows)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sampled sequences, beam requests and prompts to score waiting for admission."""
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._ready)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, *,
                    adapter: str | None = None) -> str:
        """Queue ``params.n`` samples of a prompt (or, with ``num_beams > 1``, a beam search returning
        the ``n`` best beams), with the LoRA ``adapter`` of that name (None: the base model); returns the
        request id. Raises ValueError naming the field if the request cannot run on this model (see
        :meth:`check_request`), before any work."""
        self.check_request(prompt_ids, params, adapter=adapter)
        prompt_ids, budget = fit_prompt(list(prompt_ids), params, self.model.config.n_positions)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        lora = self.lora.slot(adapter) if adapter is not None else -1
        # prompt logprobs come from the request's own prefill (_forward_prompts), or for a request with no room
        # to generate from a scoring unit, both admitted within a step's budget: never a forward here, on the
        # engine thread at once (32 prompts of 255 tokens stalled every stream ~15 s)
        if budget == 0 and params.prompt_logprobs is not None:
            self._waiting.append(_Scoring(request_id, prompt_ids, params, lora))
            self._hold(lora, 1)
        elif budget == 0:
            self._ready += _no_tokens(request_id, params)
        elif params.num_beams > 1:
            search = BeamSearch(prompt_ids, params, budget, self.tokenizer, self._decodable, self.eos_token_id,
                                self.device)
            self._waiting.append(_BeamGroup(request_id, search, budget, None, lora))
            self._hold(lora, 1)
        else:
            self._waiting += [_Sequence(request_id, index, prompt_ids, params, budget, self.tokenizer,
                                        self.device, self.eos_token_id, None, lora) for index in range(params.n)]
            self._hold(lora, params.n)
        return request_id

    def _hold(self, lora: int, units: int) -> None:
        for _ in range(units):  # each sampled sequence (or beam request) holds its adapter until it ends
            if lora >= 0:
                self.lora.acquire(lora)

    def _end(self, unit: _Unit) -> None:
        """A sequence (or beam request) leaves the engine: its adapter is released, once."""
        if not unit.ended:
            unit.ended = True
            if unit.lora >= 0:
                self.lora.release(unit.lora)

    def check_request(self, prompt_ids: list[int], params: SamplingParams, *, adapter: str | None = None) -> None:
        """Check a request against this model (``add_request`` does): the prompt's token ids, the ids in
        ``logit_bias`` and ``stop_token_ids``, the tokens ``bad_words`` encode to, the length (prompt + new
        tokens vs ``n_positions``), ``num_beams`` (its beams are rows: at most ``max_batch``) and the LoRA
        ``adapter`` (loaded). Raises ValueError naming the field; does no work."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if adapter is not None and (self.lora is None or adapter not in self.lora):
            loaded = ", ".join(repr(n) for n in self.lora.names()) if self.lora is not None and len(self.lora) else ""
            raise ValueError(f"adapter {adapter!r} is not loaded" + (f" (loaded: {loaded})" if loaded else
                                                                   " (this model has no LoRA adapters)"))
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab),
                   None)
        if bad is not None:
            raise ValueError(f"prompt holds token id {bad!r}, outside the model's vocabulary [0, {vocab - 1}]")
        params.check_vocab(vocab)
        for word, ids in zip(params.bad_words, (bad_words_ids(self.tokenizer, [w]) for w in params.bad_words)):
            bad = next((t for seq in ids for t in seq if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"bad_words holds {word!r}, whose token id {bad} is outside the model's "
                                 f"vocabulary [0, {vocab - 1}]")
        if params.num_beams > self.max_batch:
            raise ValueError(f"num_beams ({params.num_beams}) is more than the {self.max_batch} sequences this "
                             "engine decodes together (max_batch): each beam is a row of the batch")
        fit_prompt(list(prompt_ids), params, self.model.config.n_positions)
        if params.structured_outputs is not None:  # compiled for this tokenizer (cached): ValueError naming it
            compiled_matcher(params.structured_outputs, self.tokenizer)

    @torch.inference_mode()
    def _prompt_logprobs(self, prompt_ids: list[int], top_n: int, lora: int = -1) -> list[TokenLogprob]:
        """Logprobs of prompt tokens 1.. under the model (with adapter ``lora``; one plain forward, the KV
        cache untouched)."""
        if len(prompt_ids) < 2:
            return []
        ids = torch.tensor([prompt_ids], device=self.device)
        with lora_hooks(self.model, LoRAMapping.of(self.lora, [lora]), len(prompt_ids)):
            logits = self.model(ids)[0, :-1, :self._decodable].float()
        return token_logprobs(torch.log_softmax(logits, dim=-1), prompt_ids[1:], top_n, self.tokenizer)

    @torch.inference_mode()  # the cache rows it moves are inference tensors
    def abort(self, request_id: str) -> None:
        """Drop every sample (or beam) of a request, waiting or running (no further output for it)."""
        for unit in self._waiting:
            if unit.request_id == request_id:
                self._end(unit)
        self._waiting = deque(u for u in self._waiting if u.request_id != request_id)
        self._ready = [o for o in self._ready if o.request_id != request_id]
        self._groups = [g for g in self._groups if g.request_id != request_id]
        for row in [r for r in self._running if r.request_id == request_id]:
            self._release(row)
            self._end(row if row.group is None else row.group)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Decode one token for every running row (sampled sequences and beams), then admit waiting
        requests with one prefill."""
        outputs, self._ready = self._ready, []
        if self._running:
            rows = list(self._running)
            logits = runtime.decode(self.model, [r.last_token for r in rows], [r.cached for r in rows],
                                    lora=LoRAMapping.of(self.lora, [r.lora for r in rows]))
            outputs += self._advance(rows, logits)
        free = self.max_batch - len(self._running)
        if self._waiting and free >= self._waiting[0].width:
            new: list[_Unit] = []
            scored, kept = set(), 0  # prompts (by id) whose every position's logits this step computes, tokens
            while self._waiting and self._waiting[0].width <= free:  # first come, first served
                unit = self._waiting[0]
                if unit.params.prompt_logprobs is not None and id(unit.prompt_ids) not in scored:
                    # a step's budget of them: the running streams decode between (bounds the stall, not only
                    # memory); the first always goes, so every request is admitted in turn
                    if scored and kept + len(unit.prompt_ids) > _PROMPT_LOGPROBS_TOKENS:
                        break
                    scored.add(id(unit.prompt_ids))
                    kept += len(unit.prompt_ids)
                free -= unit.width
                new.append(self._waiting.popleft())
            outputs += [out for unit in new if isinstance(unit, _Scoring) for out in self._score(unit)]
            new = [unit for unit in new if not isinstance(unit, _Scoring)]
            if new:
                outputs += self._admit(new)
        return outputs

    def _score(self, unit: _Scoring) -> list[RequestOutput]:
        """The outputs of a scoring request: its prompt's logprobs, no tokens (or its error, it alone)."""
        try:
            prompt_lp = self._prompt_logprobs(unit.prompt_ids, unit.params.prompt_logprobs, unit.lora)
        except Exception as exc:  # noqa: BLE001 - this request's own fault
            return _no_tokens(unit.request_id, unit.params, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._end(unit)
        return _no_tokens(unit.request_id, unit.params, prompt_lp)

    # -- fault isolation ----------------------------------------------------------------------
    def _admit(self, units: list[_Unit]) -> list[RequestOutput]:
        """Prefill ``units``; if that raises, retry them one by one: only those that fail alone end."""
        try:
            return self._prefill(units)
        except Exception as exc:  # noqa: BLE001 - attributed below, one request at a time
            for unit in units:  # free the rows they took (their cache contents are discarded)
                self._drop(unit)
            if len(units) == 1:
                self._end(units[0])
                return [self._failed(units[0], exc)]
        self._pipeline_key, self._pipeline = (), None
        return [out for unit in units for out in self._admit([unit])]

    def _failed(self, unit: _Sequence | _BeamGroup, exc: BaseException) -> RequestOutput:
        """The last output of a sequence (or beam request) stopped by a fault of its own (its rows are free)."""
        return RequestOutput(unit.request_id, unit.index, [], "", True, "error",
                             [] if unit.params.logprobs is not None else None,
                             error=f"{type(exc).__name__}: {exc}")

    def _sample_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int | BaseException]:
        """Each row's token computed alone (after the batched pipeline raised): a row that fails alone
        gets its exception instead of a token; the others are what the batch would have given."""
        self._pipeline_key, self._pipeline = (), None  # its per-row state may be half-updated
        tokens: list[int | BaseException] = []
        for i, seq in enumerate(seqs):
            try:
                pipeline = LogitsPipeline([seq.params], self.model.config.vocab_size, tokenizer=self.tokenizer,
                                          device=self.device, grammar_states=[seq.grammar])
                scores = pipeline(logits[i:i + 1], [seq.history], [len(seq.prompt_ids)])
                tokens.append(int(sample(scores, [seq.params], [seq.generator])[0]))
            except Exception as exc:  # noqa: BLE001 - this row's own fault
                tokens.append(exc)
        return tokens

    # -- internals ----------------------------------------------------------------------------
    def _prefill(self, units: list[_Unit]) -> list[RequestOutput]:
        # The samples (or beams) of one request share its prompt (the same list): prefill it once, copy the row.
        seqs: list[_Row] = [row for unit in units for row in unit.rows]
        self._groups += [u for u in units if isinstance(u, _BeamGroup)]
        firsts: dict[int, int] = {}
        for i, seq in enumerate(seqs):
            firsts.setdefault(id(seq.prompt_ids), i)
        lead = set(firsts.values())
        pool = self.prefix_cache
        if pool is not None:
            # the runtime's first look at a model may move its weights (onto huge pages: the same values, new
            # storage), which the pool's fingerprint would take for new weights and drop what it holds: let it
            # look first (a dictionary lookup after the first time)
            runtime.inference_runner(self.model)
            pool.check_weights(self.model)
        # each prompt's cached prefix (none without a pool, nor for prompt logprobs: they need every position's
        # logits); the prefill computes the rest
        cached = {id(seqs[i].prompt_ids): pool.match(seqs[i].prompt_ids, self._cache_key(seqs[i]))
                  if pool is not None and _prompt_logprobs_wanted(seqs[i]) is None else [] for i in lead}
        starts = {key: len(blocks) * (pool.block_size if pool is not None else 0) for key, blocks in cached.items()}
        # similar lengths left to compute together, those that want prompt logprobs apart (all their logits)
        unique = sorted((seqs[i] for i in lead), key=lambda s: (_prompt_logprobs_wanted(s) is not None,
                                                               len(s.prompt_ids) - starts[id(s.prompt_ids)]))
        seqs = unique + [s for i, s in enumerate(seqs) if i not in lead]
        start = len(self._running)
        self._ensure_cache(start + len(seqs), max(s.max_len for s in seqs + self._running))
        for i, seq in enumerate(seqs):
            seq.row = start + i
        self._running += seqs
        if pool is not None:
            for seq in unique:
                pool.load(self.model.caches(), seq.row, cached[id(seq.prompt_ids)])
        parts, i = [], 0
        prompt_lps: dict[int, list[TokenLogprob]] = {}  # id(a prompt's list) -> its prompt logprobs
        while i < len(unique):  # right-padded groups of at most _PREFILL_TOKENS padded tokens, within the cache
            j, first = i + 1, starts[id(unique[i].prompt_ids)]
            wants = _prompt_logprobs_wanted(unique[i]) is not None
            budget = _PROMPT_LOGPROBS_TOKENS if wants else _PREFILL_TOKENS  # all logits: [tokens, V] floats
            while j < len(unique):
                width = len(unique[j].prompt_ids) - starts[id(unique[j].prompt_ids)]
                first = max(first, starts[id(unique[j].prompt_ids)])
                if ((j + 1 - i) * width > budget or first + width > self.model.max_seq
                        or (_prompt_logprobs_wanted(unique[j]) is not None) != wants):
                    break
                j += 1
            parts.append(self._forward_prompts(unique[i:j], start + i, [starts[id(s.prompt_ids)] for s in unique[i:j]],
                                               prompt_lps))
            i = j
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        if pool is not None:
            for seq in unique:
                pool.store(self.model.caches(), seq.row, seq.prompt_ids, self._cache_key(seq))
        source = {id(s.prompt_ids): j for j, s in enumerate(unique)}
        for seq in seqs:  # a request's samples (or beams) share its prompt's logprobs, given with their first output
            if id(seq.prompt_ids) in prompt_lps:
                if seq.group is None:
                    seq.prompt_logprobs = prompt_lps[id(seq.prompt_ids)]
                else:
                    seq.group.prompt_logprobs = prompt_lps[id(seq.prompt_ids)]
        for seq in seqs[len(unique):]:
            for cache in self.model.caches():
                cache.copy_row(start + source[id(seq.prompt_ids)], seq.row, len(seq.prompt_ids))
        return self._advance(seqs, logits[[source[id(s.prompt_ids)] for s in seqs]])

    def _cache_key(self, row: _Row) -> int:
        """What a row's cached keys and values depend on besides its tokens: its adapter (every load its own)."""
        return self.lora.uid(row.lora) if self.lora is not None else 0

    def _forward_prompts(self, seqs: list[_Row], first_row: int, starts: list[int],
                         prompt_lps: dict[int, list[TokenLogprob]]) -> torch.Tensor:
        """Prefill prompts into cache rows ``first_row...``, each from position ``starts[i]`` on (the slots
        before it hold its cached prefix); next-token logits ``[len(seqs), V]``. The prompt logprobs of
        those that ask for them go into ``prompt_lps`` (by ``id`` of their prompt list)."""
        lens = [len(s.prompt_ids) - first for s, first in zip(seqs, starts)]
        self.prefill_tokens += sum(lens)
        width = max(lens)
        idx = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (s, first) in enumerate(zip(seqs, starts)):
            idx[i, :lens[i]] = torch.tensor(s.prompt_ids[first:])
        pos = torch.arange(width)[None] + torch.tensor(starts)[:, None]
        last = torch.tensor(lens, device=self.device) - 1
        wanted = [_prompt_logprobs_wanted(s) for s in seqs]
        keep_all = any(w is not None for w in wanted)  # every position's logits, not only the last
        logits = runtime.forward(self.model, idx.to(self.device), input_pos=pos.to(self.device),
                                 rows=slice(first_row, first_row + len(seqs)), logits_index=None if keep_all else last,
                                 lora=LoRAMapping.of(self.lora, [s.lora for s in seqs]))
        if not keep_all:
            return logits
        for i, (seq, top_n) in enumerate(zip(seqs, wanted)):  # their starts are 0: no cached prefix
            if top_n is not None:  # position t's logits give token t + 1's logprob
                scores = torch.log_softmax(logits[i, :lens[i] - 1, :self._decodable].float(), dim=-1)
                prompt_lps[id(seq.prompt_ids)] = token_logprobs(scores, seq.prompt_ids[1:], top_n, self.tokenizer)
        return logits[torch.arange(len(seqs), device=logits.device), last]

    def _ensure_cache(self, rows: int, seq_len: int) -> None:
        """Grow the static cache when needed, keeping the running rows' contents."""
        model = self.model
        if rows <= model.max_batch and seq_len <= model.max_seq:
            return
        n_pos = model.config.n_positions
        new_rows = max(rows, model.max_batch, min(self.max_batch, 2 * model.max_batch))
        new_seq = max(model.max_seq, min(n_pos, -(-seq_len // _CACHE_GRANULE) * _CACHE_GRANULE))
        old = [(c.k, c.v) for c in model.caches()] if model.max_batch else []
        keep_rows, keep_len = len(self._running), model.max_seq
        model.setup_cache(new_rows, new_seq)
        if keep_rows:
            for cache, (k, v) in zip(model.caches(), old):
                cache.k[:keep_rows, :, :keep_len] = k[:keep_rows]
                cache.v[:keep_rows, :, :keep_len] = v[:keep_rows]

    def _scores(self, seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        key = tuple(s.uid for s in seqs)
        if key != self._pipeline_key or self._pipeline is None:
            self._pipeline = LogitsPipeline([s.params for s in seqs], self.model.config.vocab_size,
                                            tokenizer=self.tokenizer, device=self.device,
                                            eos_token_id=self.eos_token_id, grammar_states=[s.grammar for s in seqs])
            self._pipeline_key = key
        return self._pipeline(logits, [s.history for s in seqs], [len(s.prompt_ids) for s in seqs])

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[RequestOutput]:
        """Advance every row by one token (``logits [len(rows), V]``, row ``i`` for ``rows[i]``): sampled
        sequences sample theirs, each beam request selects its beams."""
        if not self._groups:  # sampled rows only
            return self._sample(rows, logits)
        sampled: list[int] = []
        beams: dict[int, list[int]] = {}  # id(group) -> the index in rows of each of its beams
        for i, row in enumerate(rows):
            if row.group is None:
                sampled.append(i)
            else:
                beams.setdefault(id(row.group), [0] * row.group.width)[row.beam] = i
        # each group's logits are taken before any row moves (a finishing sequence's row is refilled)
        searches = [(row.group, _take(logits, beams[id(row.group)])) for row in rows
                    if row.group is not None and row.beam == 0]
        outputs = self._sample([rows[i] for i in sampled], _take(logits, sampled)) if sampled else []
        for group, group_logits in searches:
            outputs += self._beam_step(group, group_logits)
        return outputs

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample one token for each sequence (``logits [B, V]``), apply stopping, emit outputs."""
        logits = logits.float()
        if self._decodable < logits.shape[-1]:  # padded embedding rows: ids the tokenizer cannot decode
            logits[:, self._decodable:] = float("-inf")
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        try:
            tokens: list[int | BaseException] = sample(self._scores(seqs, logits), [s.params for s in seqs],
                                                       [s.generator for s in seqs]).tolist()
        except Exception:  # noqa: BLE001 - find the row(s) at fault; the others go on
            tokens = self._sample_rows(seqs, logits)
        outputs = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            try:
                if isinstance(token, BaseException):
                    raise token
                outputs.append(self._emit(seq, token, raw_lp[i:i + 1] if want_lp[i] else None))
            except Exception as exc:  # noqa: BLE001 - this sequence's own fault: it alone ends
                if seq.row >= 0:
                    self._release(seq)
                self._end(seq)
                outputs.append(self._failed(seq, exc))
        return outputs

    def _beam_step(self, group: _BeamGroup, logits: torch.Tensor) -> list[RequestOutput]:
        """One selection step of a beam request (``logits [num_beams, V]``): its rows' cache follows the
        beams it keeps; when the search ends, its rows are freed and its ``n`` best beams come out."""
        try:
            if not group.search.step(logits):
                if group.search.reordered:
                    self._reorder_rows(group)
                return []
            outputs = group.search.outputs(self.model, group.request_id, group.prompt_logprobs)
        except Exception as exc:  # noqa: BLE001 - this request's own fault: it alone ends
            self._drop(group)
            self._end(group)
            return [self._failed(group, exc)]
        self._drop(group)
        self._end(group)
        return outputs

    def _reorder_rows(self, group: _BeamGroup) -> None:
        """Move a beam request's cache rows after its selection step: new beam ``i`` continues old beam
        ``reorder[i]`` (transformers' ``_reorder_cache``), over the slots its beams have cached."""
        rows = [r.row for r in group.rows]
        index = torch.tensor(rows, device=self.device)
        target: slice | torch.Tensor = slice(rows[0], rows[0] + len(rows)) \
            if rows == list(range(rows[0], rows[0] + len(rows))) else index
        source, length = index[group.search.reorder], group.search.cached
        for cache in self.model.caches():
            cache.k[target, :, :length] = cache.k[source, :, :length]
            cache.v[target, :, :length] = cache.v[source, :, :length]

    def _drop(self, unit: _Unit) -> None:
        """Free the rows a unit holds (a beam request leaves the running groups)."""
        if isinstance(unit, _BeamGroup) and unit in self._groups:
            self._groups.remove(unit)
        for row in unit.rows:
            if row.row >= 0:
                self._release(row)

    def _emit(self, seq: _Sequence, token: int, raw_lp: torch.Tensor | None) -> RequestOutput:
        """Append ``token`` to ``seq``, apply stopping, free its row when it finishes."""
        seq.output_ids.append(token)
        entry = token_logprobs(raw_lp, [token], seq.params.logprobs, self.tokenizer)[0] if raw_lp is not None else None
        text, logprobs, reason = seq.text.push(token, entry)
        if reason is None:
            if seq.grammar is not None:
                seq.grammar.advance(seq.output_ids)
            if seq.grammar is not None and seq.grammar.finished:
                reason = "stop"  # the output is complete: its grammar allows nothing more
            elif len(seq.output_ids) >= seq.budget:
                reason = "length"
            if reason is not None:
                more_text, more_logprobs = seq.text.finish()
                text, logprobs = text + more_text, logprobs + more_logprobs
        output = RequestOutput(seq.request_id, seq.index, [token], text, reason is not None, reason,
                               logprobs if raw_lp is not None else None, seq.prompt_logprobs)
        seq.prompt_logprobs = None
        if reason is not None:
            if self.prefix_cache is not None:  # a conversation's next turn starts with this one
                self.prefix_cache.store(self.model.caches(), seq.row, seq.history[:seq.cached], self._cache_key(seq))
            self._release(seq)
            self._end(seq)
        return output

    def _release(self, seq: _Row) -> None:
        """Free a finished row, moving the last running row into it."""
        row = seq.row
        last = self._running.pop()
        if last is not seq:
            for cache in self.model.caches():
                cache.copy_row(last.row, row, last.cached + 1)
            last.row = row
            self._running[row] = last
        seq.row = -1
