"""Batch invariance, bit for bit: a seeded request gives the same token ids alone or batched.

The kernels compute each token's row with the same operations in the same order whatever else is in
the batch (kernels.c), in prefill and decode, fp32 and int8. Checked here for 100 seeds in several
batch mixes: alone; all at once through continuous batching (neighbours shorter and longer, joining
and leaving mid-decode); another order and batch limit with n=2; long-prompt neighbours; and through
a real ``gpt2lab serve`` under concurrent traffic.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import gpt2lab
from gpt2lab import kernels, runtime
from gpt2lab.generation import Engine
from gpt2lab.sampling import SamplingParams

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not kernels.available(), reason="gpt2lab's C kernels did not build here")]

WORDS = ("the king queen night sea sword crown ghost father mother love death sleep dream speak "
         "word heart soul lord lady fair foul time world").split()
NEW_TOKENS = 8


def prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of 1 to about 40 tokens."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def params(seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_k": 50, "seed": seed,
                             "ignore_eos": True, **kw})


def run(gen, requests: list[tuple[list[int], SamplingParams]], max_batch: int) -> list[list[list[int]]]:
    """Token ids of every sample of every request, run through one continuous-batching engine."""
    engine = Engine(gen.model, gen.tokenizer, max_batch=max_batch)
    for i, (ids, p) in enumerate(requests):
        engine.add_request(ids, p, request_id=str(i))
    out = [[[] for _ in range(p.n)] for _, p in requests]
    while engine.has_unfinished():
        for o in engine.step():
            out[int(o.request_id)][o.index] += o.token_ids
    return out


def check_mixes(gen, n_seeds: int) -> None:
    texts = prompts(n_seeds)
    encoded = [gen.encode_prompt(t) for t in texts]
    alone = [run(gen, [(ids, params(s))], 1)[0][0] for s, ids in enumerate(encoded)]
    assert len({tuple(a) for a in alone}) > n_seeds // 2  # really sampled, not one fixed output
    # 1. all together, 16 rows at a time: every neighbour mix of lengths, rows joining and leaving
    together = run(gen, [(ids, params(s)) for s, ids in enumerate(encoded)], 16)
    assert [r[0] for r in together] == alone
    # 2. reversed order, 7 rows, two samples each (sample 0 is the request's seed itself)
    reverse = run(gen, [(ids, params(s, n=2)) for s, ids in reversed(list(enumerate(encoded)))], 7)[::-1]
    assert [r[0] for r in reverse] == alone
    # 3. every request between long-prompt neighbours with other budgets
    long_ids = gen.encode_prompt(" ".join(WORDS * 4))
    mixed = []
    for s, ids in enumerate(encoded):
        mixed += [(long_ids, params(1000 + s, max_new_tokens=3 + s % 7)), (ids, params(s))]
    got = run(gen, mixed, 5)
    assert [got[2 * s + 1][0] for s in range(n_seeds)] == alone


@pytest.mark.usefixtures("one_thread")  # a tiny model: one thread is faster
def test_100_seeds_in_every_batch_mix_fp32(tiny_checkpoint):
    check_mixes(gpt2lab.load(tiny_checkpoint), 100)


@pytest.mark.usefixtures("one_thread")
def test_100_seeds_in_every_batch_mix_int8(tiny_checkpoint):
    check_mixes(gpt2lab.load(tiny_checkpoint, quantization="int8"), 100)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_seeds_on_the_bundled_model(quantization):
    """Two threads, the bundled model's real weights."""
    kw = {"quantization": quantization} if quantization else {}
    check_mixes(gpt2lab.load("shakespeare-gpt2", **kw), 12)


def completions(gen, requests: list[tuple[list[int], SamplingParams]], max_batch: int) -> list[list[tuple]]:
    """Token ids and logprobs of every completion of every request, run through one runner."""
    runner = gen.runner(max_batch=max_batch)
    for i, (ids, p) in enumerate(requests):
        runner.add(ids, p, request_id=str(i))
    runner.run()
    return [[(c.token_ids, [e.logprob for e in c.logprobs or []]) for c in runner.completions(str(i))]
            for i in range(len(requests))]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_beams_are_the_same_alone_or_beside_sampled_rows(tiny_checkpoint, quantization):
    """Beams are rows of the batch, and each row's logits are bit-identical whatever the batch: a beam
    request gives the same beams (tokens and logprobs) alone or beside sampled requests that join and
    leave mid-search (rows moving under it), and the sampled ones give what they give alone."""
    gen = gpt2lab.load(tiny_checkpoint, **({"quantization": quantization} if quantization else {}))
    texts = prompts(12, seed=2)
    beams = [SamplingParams(num_beams=4, n=2, max_new_tokens=12, logprobs=1),
             SamplingParams(num_beams=3, max_new_tokens=9, length_penalty=0.5, early_stopping=True, logprobs=0),
             SamplingParams(num_beams=2, n=2, max_new_tokens=14, repetition_penalty=1.2)]
    requests = []
    for s, text in enumerate(texts):
        sampled = params(s, max_new_tokens=3 + s % 9, logprobs=1)
        requests.append((gen.encode_prompt(text), beams[s // 4] if s % 4 == 1 else sampled))
    alone = [completions(gen, [r], max(1, r[1].num_beams))[0] for r in requests]
    assert completions(gen, requests, 16) == alone
    assert completions(gen, requests[::-1], 9)[::-1] == alone  # another order, fewer rows: beams wait their turn


def test_through_the_server_under_concurrent_traffic(tmp_path, tiny_checkpoint):
    """Seeded completions sent 12 at a time to a real ``gpt2lab serve`` (max batch 8): the same text
    as each prompt alone in this process."""
    import httpx

    from .server_helpers import get, launch

    launch("invariance", tiny_checkpoint, tmp_path, "--max-batch", "8")
    gen = gpt2lab.load(tiny_checkpoint)
    texts = prompts(40, seed=1)
    want = [gen.generate(t, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, seed=s)[0].text
            for s, t in enumerate(texts)]
    server = get("invariance")

    def complete(s: int) -> str:
        body = {"model": str(tiny_checkpoint), "prompt": texts[s], "max_tokens": NEW_TOKENS, "temperature": 1.0,
                "top_k": 50, "seed": s}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(complete, range(len(texts))))
    assert got == want


def test_prefill_rows_do_not_depend_on_padding(tiny_checkpoint):
    """One forward: a prompt's next-token logits are bit-identical alone and right-padded in a batch."""
    model = gpt2lab.load(tiny_checkpoint, quantization="int8").model
    ids = torch.randint(0, 50257, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.setup_cache(max_batch=3, max_seq=32)
        alone = runtime.forward(model, ids[:1, :9], input_pos=torch.arange(9)[None], logits_index=torch.tensor([8]))
        batched = runtime.forward(model, ids, input_pos=torch.arange(30)[None].expand(3, 30),
                                  logits_index=torch.tensor([8, 29, 3]))
    assert torch.equal(alone[0], batched[0])


@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_decode_step_equals_the_prefill_of_the_same_tokens(tiny_checkpoint, quantization, threads):
    """A decode step (one token per cache row: keys, values and attention in one loop) gives each row the
    logits, bit for bit, that a prefill of the whole sequence (keys and values stored first) gives its last
    token, for ragged rows that start and stop at different steps."""
    model = gpt2lab.load(tiny_checkpoint, quantization=quantization).model
    ids = torch.randint(0, 50257, (4, 24), generator=torch.Generator().manual_seed(1))
    lens = [3, 9, 1, 14]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            model.setup_cache(max_batch=6, max_seq=32)
            for r, n in enumerate(lens):
                runtime.forward(model, ids[r:r + 1, :n], input_pos=torch.arange(n)[None], rows=slice(1 + r, 2 + r))
            for step, (a, b) in enumerate([(0, 4), (1, 3), (0, 2), (2, 4), (3, 4), (0, 4)]):
                live = list(range(a, b))  # contiguous cache rows 1 + a .. b; the others sit this step out
                pos = torch.tensor([lens[r] for r in live])[:, None]
                out = runtime.forward(model, ids[live, pos[:, 0]][:, None], input_pos=pos, rows=slice(1 + a, 1 + b))
                for j, r in enumerate(live):
                    n = lens[r] + 1
                    lens[r] = n
                    alone = runtime.forward(model, ids[r:r + 1, :n], input_pos=torch.arange(n)[None], rows=slice(5, 6),
                                  logits_index=torch.tensor([n - 1]))
                    assert torch.equal(out[j, 0], alone[0]), (step, r)
    finally:
        torch.set_num_threads(saved)
