"""Prefix reuse in the library (gpt2lab.generation.prefix_cache): a prompt that starts with a cached prefix
prefills only the rest, and its tokens and logprobs are bit-identical to those without the pool; the pool is
bounded (LRU), keyed by adapter, and dropped when the weights change."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.apps.chat import ChatSession
from gpt2lab.generation.prefix_cache import PrefixCache
from gpt2lab.sampling import SamplingParams

from .conftest import tiny_model

PREAMBLE = "You are a careful assistant. Answer briefly and stay on topic. " * 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory, "prefix-model", seed=7, n_positions=512)


def _run(gen, prompts: list[str]) -> tuple[list, int]:
    """Each prompt alone, seeded: (tokens and logprobs of each, prompt tokens the prefills computed)."""
    out, computed = [], 0
    for i, prompt in enumerate(prompts):
        runner = gen.runner()
        runner.add(gen.encode_prompt(prompt), SamplingParams(max_new_tokens=6, seed=i, logprobs=2), request_id="r")
        runner.run()
        (c,) = runner.completions("r")
        out.append((c.token_ids, [(t.logprob, t.top) for t in c.logprobs]))
        computed += runner.engine.prefill_tokens
    return out, computed


def test_shared_preamble_is_reused_and_outputs_are_bit_identical(model):
    _, gen = model
    prompts = [PREAMBLE + f"Question {i}: what is {i} plus {i}?" for i in range(5)]
    gen.prefix_cache = PrefixCache(0)
    without, full = _run(gen, prompts)
    gen.prefix_cache = PrefixCache(64 << 20)
    with_pool, computed = _run(gen, prompts)
    assert with_pool == without
    preamble = len(gen.tokenizer.encode(PREAMBLE))
    stats = gen.prefix_cache.stats
    assert (stats.hits, stats.misses) == (4, 1)
    assert full - computed == stats.saved_tokens >= 4 * (preamble - gen.prefix_cache.block_size)


def test_a_chat_session_prefills_only_each_new_turn(model):
    _, gen = model
    params = SamplingParams(max_new_tokens=10, seed=1, temperature=0.8)

    def chat(pool: PrefixCache) -> tuple[list[str], list[int]]:
        gen.prefix_cache = pool
        session = ChatSession(gen, persona="You are a pirate.", params=params)
        replies = [session.reply(f"Tell me about island number {i}.") for i in range(8)]
        return replies, session

    without, _ = chat(PrefixCache(0))
    pool = PrefixCache(64 << 20)
    with_pool, session = chat(pool)
    assert with_pool == without
    assert pool.stats.hits == 7  # every turn after the first starts with the conversation so far
    prompt = len(gen.tokenizer.encode(session.last_prompt.text))
    assert pool.stats.saved_tokens > prompt  # the turns' prompts were mostly taken from the pool


def test_the_pool_stays_within_its_capacity_evicting_least_recently_used(model):
    _, gen = model
    c = gen.config
    block = 2 * c.n_layer * c.n_embd * 16 * 4  # bytes of one block of 16 tokens' keys and values (fp32)
    pool = gen.prefix_cache = PrefixCache(3 * block)
    gen.generate("alpha " * 80, max_new_tokens=1)  # 80 tokens: more blocks than fit
    assert len(pool) == 3 and pool.bytes == 3 * block  # the first three blocks; the rest did not fit
    gen.generate("beta " * 80, max_new_tokens=1)
    assert len(pool) == 3 and pool.bytes <= pool.capacity and pool.stats.evictions == 3
    assert pool.match(gen.tokenizer.encode("alpha " * 80)) == []  # alpha's blocks went first


def test_blocks_are_kept_per_adapter_and_dropped_when_the_weights_change(model):
    _, gen = model
    pool = gen.prefix_cache = PrefixCache(64 << 20)
    ids = gen.tokenizer.encode(PREAMBLE)
    gen.generate(PREAMBLE, max_new_tokens=1)
    assert pool.match(ids, 12345) == []  # another adapter's key: nothing
    assert pool.match(ids) != []
    with torch.no_grad():
        gen.model.h[0].mlp.c_fc.weight.mul_(1.0)  # written in place: its version moves
    pool.check_weights(gen.model)
    assert len(pool) == 0


def test_bad_pool_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(10, block_size=0)


def test_the_first_forward_moving_the_weights_keeps_what_the_pool_holds(tmp_path_factory):
    """A fresh model's first forward moves its big tensors onto huge pages (same values, new storage): the pool
    must not take that for new weights. It did: the second request of a new server found the pool emptied, so a
    chat's second turn prefilled its whole conversation again."""
    _, gen = tiny_model(tmp_path_factory, "prefix-fresh", seed=3)  # its wte (50257 x 64) > 1 MB: it moves
    gen.prefix_cache = PrefixCache(64 << 20)
    params = SamplingParams(max_new_tokens=4, seed=0)
    first = gen.generate(PREAMBLE, params)
    second = gen.generate(PREAMBLE + "And one more thing.", params)
    stats = gen.prefix_cache.stats
    assert (stats.hits, stats.misses) == (1, 1), stats
    assert stats.saved_tokens >= len(gen.tokenizer.encode(PREAMBLE)) - gen.prefix_cache.block_size
    assert first and second
