"""Our GPT-2 against transformers.GPT2LMHeadModel on the same random weights."""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import load_model

from .conftest import SHAPES, make_hf_checkpoint


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(tmp_path, shape, safe):
    from transformers import GPT2LMHeadModel

    ckpt = make_hf_checkpoint(tmp_path, seed=3, safe=safe, **SHAPES[shape])
    ours = load_model(ckpt)
    ref = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    vocab, n_pos = ours.config.vocab_size, ours.config.n_positions
    ids = torch.randint(0, vocab, (2, min(n_pos, 100)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    print(f"{shape}/{'safetensors' if safe else 'bin'}: max abs logit diff {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kv_cache_prefill_and_decode_equal_uncached(tmp_path, shape):
    ckpt = make_hf_checkpoint(tmp_path, seed=4, **SHAPES[shape])
    model = load_model(ckpt)
    T = 40
    ids = torch.randint(0, model.config.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # [3, T, V]
        model.setup_cache(max_batch=3, max_seq=64)
        prefill = 25
        pos = torch.arange(prefill)[None].expand(3, prefill)
        out = model(ids[:, :prefill], input_pos=pos)
        assert (out - full[:, :prefill]).abs().max() < 1e-4
        for t in range(prefill, T):
            step = model(ids[:, t:t + 1], input_pos=torch.full((3, 1), t))
            assert (step[:, 0] - full[:, t]).abs().max() < 1e-4


def test_ragged_rows_share_one_batch(tmp_path):
    """Rows at different positions decode together: each equals its own uncached forward."""
    model = load_model(make_hf_checkpoint(tmp_path, seed=5, **SHAPES["tiny"]))
    lengths = [7, 3, 12]
    seqs = [torch.randint(0, 50257, (n + 1,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    model.setup_cache(max_batch=3, max_seq=32)
    with torch.no_grad():
        width = max(lengths)
        padded = torch.zeros(3, width, dtype=torch.long)
        for i, s in enumerate(seqs):
            padded[i, :lengths[i]] = s[:lengths[i]]
        pos = torch.arange(width)[None].expand(3, width)
        last = model(padded, input_pos=pos, logits_index=torch.tensor(lengths) - 1)
        nxt = torch.stack([s[n] for s, n in zip(seqs, lengths)])[:, None]
        step = model(nxt, input_pos=torch.tensor(lengths)[:, None])[:, 0]
        for i, s in enumerate(seqs):
            full = model(s[None])[0]
            assert (last[i] - full[lengths[i] - 1]).abs().max() < 1e-4
            assert (step[i] - full[lengths[i]]).abs().max() < 1e-4


def test_generator_logits_and_round_trip(tmp_path, tiny_checkpoint):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    gen = gpt2lab.load(tiny_checkpoint)
    ids = gen.tokenizer.encode("Hello world, round trip!")
    logits = gen.logits(ids)
    assert logits.shape == (len(ids), 50257)
    out = gen.save(tmp_path / "saved")
    ref = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (logits - expected).abs().max() < 1e-4
    assert GPT2TokenizerFast.from_pretrained(out)("Hello world")["input_ids"] == [15496, 995]
    # and back into gpt2lab again, unchanged
    again = gpt2lab.load(out)
    assert torch.equal(again.logits(ids), logits)
