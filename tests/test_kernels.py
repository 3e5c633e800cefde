"""gpt2lab's C kernels (model/kernels.c): the same numbers as torch, the build, and the fallback without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.checkpoints import load_model
from gpt2lab.model import kernels, optimize_for_inference

from .conftest import make_hf_checkpoint

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="gpt2lab's C kernels did not build here")


def test_kernels_build_where_there_is_a_compiler():
    """CI has gcc: the kernels must build there, or every other test here would test only the fallback."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert kernels.available()
        assert next(kernels.cache_dir().glob("gpt2lab_kernels_*.so"))


@needs_kernels
@pytest.mark.parametrize("rows,n_out,n_in", [(1, 1, 1), (1, 7, 13), (2, 4, 8), (3, 5, 768), (5, 1001, 64),
                                             (16, 2304, 768), (1, 768, 3072)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(rows, n_out, n_in, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    x = torch.randn(rows, 1, n_in, generator=gen)
    w = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
    b = torch.randn(n_out, generator=gen) if bias else None
    got = kernels.linear(x, w, b)
    assert got.shape == (rows, 1, n_out)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


DECODER_SHAPES = {
    # awkward sizes on purpose: head_dim 12, an MLP width and vocabulary that are not multiples of 4 or 8
    "odd": dict(n_layer=2, n_head=3, n_embd=36, n_inner=70, vocab_size=1001, n_positions=64,
                scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-3),
    "untied": dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, tie_word_embeddings=False),
}


@needs_kernels
@pytest.mark.parametrize("shape", list(DECODER_SHAPES))
def test_decoder_matches_the_torch_forward(shape, tmp_path):
    """Every row at its own position and cache row: the one-call decode step equals the plain forward."""
    ckpt = make_hf_checkpoint(tmp_path, seed=3, **DECODER_SHAPES[shape])
    plain, fast = load_model(ckpt), optimize_for_inference(load_model(ckpt))
    assert fast.decoder is not None
    vocab = plain.config.vocab_size
    ids = torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    lens = [20, 27, 33]
    with torch.no_grad():
        full = plain(ids)  # [3, 40, V]
        fast.setup_cache(max_batch=5, max_seq=40)
        for r, n in enumerate(lens):  # rows 2..4 of the cache, prefilled to different lengths
            fast(ids[r:r + 1, :n], input_pos=torch.arange(n)[None], rows=slice(2 + r, 3 + r))
        for step in range(4):  # ragged decode steps through the decoder
            pos = torch.tensor(lens)[:, None] + step
            logits = fast(ids[torch.arange(3), pos[:, 0]][:, None], input_pos=pos, rows=slice(2, 5))
            assert logits.shape == (3, 1, vocab)
            for r in range(3):
                assert (logits[r, 0] - full[r, pos[r, 0]]).abs().max() < 1e-4


@needs_kernels
def test_decoder_refuses_what_would_read_outside_memory(tmp_path):
    fast = optimize_for_inference(load_model(make_hf_checkpoint(tmp_path, **DECODER_SHAPES["untied"])))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="setup_cache"):
            fast(torch.tensor([[1]]), input_pos=torch.tensor([[0]]))
        fast.setup_cache(max_batch=2, max_seq=16)
        with pytest.raises(IndexError, match=r"token ids must be in \[0, 50257\)"):
            fast(torch.tensor([[50257]]), input_pos=torch.tensor([[0]]))
        with pytest.raises(ValueError, match="beyond the KV cache"):
            fast(torch.tensor([[1]]), input_pos=torch.tensor([[16]]))
        with pytest.raises(ValueError, match="beyond the KV cache"):
            fast(torch.tensor([[1], [2]]), input_pos=torch.tensor([[0], [0]]), rows=slice(1, 3))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


GREEDY = """
    import gpt2lab
    from gpt2lab.model import kernels, optimize_for_inference
    gen = gpt2lab.load({ckpt!r})
    optimize_for_inference(gen.model)
    print(kernels.available(), type(gen.model.h[0].attn.c_attn).__name__)
    print(gen.generate(["Hello there", "A longer prompt about the sea"], max_new_tokens=10, temperature=0,
                       ignore_eos=True)[1].token_ids)
"""


def test_switched_off_kernels_fall_back_to_torch_with_the_same_tokens(tiny_checkpoint):
    on = run_python(GREEDY.format(ckpt=str(tiny_checkpoint)))
    off = run_python(GREEDY.format(ckpt=str(tiny_checkpoint)), GPT2LAB_CPU_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[0] == "False PackedLinear"
    assert on.stdout.splitlines()[1] == off.stdout.splitlines()[1]


def test_build_is_cached_and_a_missing_or_broken_compiler_falls_back(tmp_path):
    probe = "from gpt2lab.model import kernels; print(kernels.available())"
    cache = tmp_path / "cache"
    first = run_python(probe, XDG_CACHE_HOME=str(cache))
    if first.stdout.strip() != "True":
        pytest.skip("no C compiler here")
    (built,) = (cache / "gpt2lab" / "kernels").iterdir()
    stamp = built.stat().st_mtime_ns
    assert run_python(probe, XDG_CACHE_HOME=str(cache)).stdout.strip() == "True"
    assert [p.name for p in (cache / "gpt2lab" / "kernels").iterdir()] == [built.name]  # not rebuilt
    assert built.stat().st_mtime_ns == stamp
    # no compiler at all: off, quietly
    nothing = run_python(probe, XDG_CACHE_HOME=str(tmp_path / "c2"), PATH="", CC="")
    assert nothing.stdout.strip() == "False" and "Traceback" not in nothing.stderr
    # a compiler that fails: off, with the reason on stderr, and no half-written library left behind
    broken = run_python(probe, XDG_CACHE_HOME=str(tmp_path / "c3"), CC=shutil.which("false") or "false")
    assert broken.stdout.strip() == "False"
    assert "building gpt2lab's CPU kernels failed" in broken.stderr
    assert not list((tmp_path / "c3" / "gpt2lab" / "kernels").glob("*.so"))
    again = run_python(probe, XDG_CACHE_HOME=str(tmp_path / "c3"), CC=shutil.which("false") or "false")
    assert again.stdout.strip() == "False" and "failed" not in again.stderr  # remembered, not retried
