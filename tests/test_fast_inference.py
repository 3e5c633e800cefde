"""optimize_for_inference: same logits, same cached decoding, same checkpoints, and no training."""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import load_model
from gpt2lab.model import InferenceOnlyError, PackedLinear, kernels, optimize_for_inference
from gpt2lab.model.fast import KernelLinear, PackedLMHead

from .conftest import SHAPES, make_hf_checkpoint

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def fast_linear() -> type:
    """What optimize_for_inference installs: gpt2lab's kernels where they build (on any machine with a
    C compiler, CI included), else oneDNN's packed linear."""
    return KernelLinear if kernels.available() else PackedLinear


@pytest.fixture(scope="module", params=list(SHAPES) + ["untied"])
def pair(request, tmp_path_factory):
    """(plain, optimised) copies of one random checkpoint per shape."""
    shape = dict(SHAPES["tiny"], tie_word_embeddings=False) if request.param == "untied" else SHAPES[request.param]
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=7, **shape)
    return load_model(ckpt), optimize_for_inference(load_model(ckpt))


def test_swaps_every_linear_and_is_idempotent(pair):
    plain, fast = pair
    for block in fast.h:
        for name in LINEARS:
            assert isinstance(block.get_submodule(name), fast_linear())
    assert isinstance(fast.fast_head, PackedLMHead)
    modules = list(fast.modules())
    assert optimize_for_inference(fast) is fast
    assert list(fast.modules()) == modules
    assert fast.num_parameters() == plain.num_parameters()


def test_logits_match_unoptimised(pair):
    plain, fast = pair
    cfg = plain.config
    ids = torch.randint(0, cfg.vocab_size, (2, min(cfg.n_positions, 70)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (fast(ids) - plain(ids)).abs().max().item()
    assert diff < 1e-4


def test_reblocking_for_another_batch_size_keeps_weights_and_logits(pair):
    plain, fast = pair
    ids = torch.randint(0, plain.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    for batch_size in (8, 1):
        optimize_for_inference(fast, batch_size=batch_size)
        linears = [block.get_submodule(name) for block in fast.h for name in LINEARS]
        assert all(type(m) is fast_linear() for m in linears)
        if fast_linear() is PackedLinear:
            assert {m.pack_rows for m in linears} == {1 if batch_size == 1 else 16}
            if batch_size > 1:  # the LM head's multi-row copy is ready before the first batch
                assert fast.fast_head.packed is not None
        after = fast.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        with torch.no_grad():
            assert (fast(ids) - plain(ids)).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        optimize_for_inference(fast, batch_size=0)


def test_cached_decode_matches_unoptimised(pair):
    """Prefill + decode through the KV cache (uniform and ragged rows, logits_index, a row offset)."""
    plain, fast = pair
    vocab = plain.config.vocab_size
    ids = torch.randint(0, vocab, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = plain(ids)  # [3, 30, V], uncached
        fast.setup_cache(max_batch=4, max_seq=32)
        rows = slice(1, 4)  # not starting at row 0
        pos = torch.arange(20)[None].expand(3, 20)
        last = fast(ids[:, :20], input_pos=pos, rows=rows, logits_index=torch.tensor([19, 19, 19]))
        assert (last - full[:, 19]).abs().max() < 1e-4
        for t in range(20, 24):  # every row at the same position
            step = fast(ids[:, t:t + 1], input_pos=torch.full((3, 1), t), rows=rows)
            assert (step[:, 0] - full[:, t]).abs().max() < 1e-4
        # ragged: rows at different positions in one step (the masked path)
        lens = torch.tensor([24, 26, 28])
        for r in (1, 2):  # bring rows 1 and 2 further along one by one
            for t in range(24, int(lens[r])):
                one = slice(rows.start + r, rows.start + r + 1)
                fast(ids[r:r + 1, t:t + 1], input_pos=torch.tensor([[t]]), rows=one)
        step = fast(ids[torch.arange(3), lens][:, None], input_pos=lens[:, None], rows=rows)
        for r in range(3):
            assert (step[r, 0] - full[r, lens[r]]).abs().max() < 1e-4
        # a second prefill chunk starting past 0 (masked, T > 1)
        fast.setup_cache(max_batch=4, max_seq=32)
        fast(ids[:, :10], input_pos=torch.arange(10)[None].expand(3, 10))
        chunk = fast(ids[:, 10:16], input_pos=torch.arange(10, 16)[None].expand(3, 6))
        assert (chunk - full[:, 10:16]).abs().max() < 1e-4


def test_state_dict_unchanged(pair):
    plain, fast = pair
    ref, got = plain.state_dict(), fast.state_dict()
    assert list(got) == list(ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_load_state_dict_repacks(tmp_path):
    """Loading other weights into an optimised model changes what it computes (the packed copy follows)."""
    fast = optimize_for_inference(load_model(make_hf_checkpoint(tmp_path / "a", seed=1, **SHAPES["tiny"])))
    other = load_model(make_hf_checkpoint(tmp_path / "b", seed=2, **SHAPES["tiny"]))
    fast.load_state_dict(other.state_dict())
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (fast(ids) - other(ids)).abs().max() < 1e-4


def test_save_after_optimisation_round_trips_to_transformers(tmp_path, tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    gen = gpt2lab.load(tiny_checkpoint)
    optimize_for_inference(gen.model)
    out = gen.save(tmp_path / "saved")
    original = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    for (name, a), (name_b, b) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name


def test_generation_unchanged(tiny_checkpoint):
    plain, fast = gpt2lab.load(tiny_checkpoint), gpt2lab.load(tiny_checkpoint)
    optimize_for_inference(fast.model)
    prompts = ["Hello there", "A longer prompt about the sea and the sky"]
    for kw in (dict(temperature=0.0), dict(top_k=50, temperature=1.0, seed=3)):
        a = plain.generate(prompts, max_new_tokens=12, ignore_eos=True, **kw)
        b = fast.generate(prompts, max_new_tokens=12, ignore_eos=True, **kw)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_training_an_optimised_model_fails_clearly(pair):
    _, fast = pair
    with pytest.raises(InferenceOnlyError, match="optimised for inference.*load the checkpoint again"):
        fast.train()
    assert not fast.training and not any(m.training for m in fast.modules())
    with pytest.raises(InferenceOnlyError):
        fast.h[0].attn.c_attn.train()
    assert not any(p.requires_grad for p in fast.parameters())
    fast.eval()  # still allowed
    with pytest.raises(InferenceOnlyError, match="before optimize_for_inference"):
        fast.half()
    fast.to("cpu", torch.float32)  # a no-op move is fine
