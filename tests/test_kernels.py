"""gpt2lab's C kernels (gpt2lab/kernels/kernels.c): the same numbers as torch (fp32, int8, int4, bf16), each row
independent of the others, the C interface against its one definition (kernels/abi.py), the build, and the
fallback without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from gpt2lab import kernels, runtime
from gpt2lab.checkpoints import load_model
from gpt2lab.kernels import abi, build
from gpt2lab.model.quantize import int4_linear, int8_linear, quantize_, unpack_int4
from gpt2lab.runtime import inference_runner

from .conftest import make_hf_checkpoint

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="gpt2lab's C kernels did not build here")


def test_the_c_interface_is_written_once():
    """kernels.c's exported functions (argument names, types and order, return types), its structures and
    the enum values Python passes are exactly kernels/abi.py's tables, from which ctypes' declarations are
    built; the 30-argument gpt2lab_forward (29 before its LoRA table) and the others were once declared twice,
    by hand."""
    source = kernels.SOURCE.read_text(encoding="utf-8")
    assert abi.differences(source) == []
    functions, structs, _ = abi.parse(source)
    assert set(functions) == set(abi.FUNCTIONS) and len(functions["gpt2lab_forward"][1]) == 30
    for struct, name in ((kernels.Layer, "gpt2lab_layer"), (kernels.LoRAPair, "gpt2lab_lora_pair"),
                         (kernels.LoRATable, "gpt2lab_lora")):
        assert [field for field, _ in struct._fields_] == [field for field, _ in structs[name]]
    if kernels.available():
        for name, (returns, arguments) in abi.FUNCTIONS.items():
            function = getattr(kernels.library(), name)
            assert function.argtypes == [abi.ctype(t) for _, t in arguments]
            assert function.restype == abi.ctype(returns)


@pytest.mark.parametrize("before,after,found", [
    ("int64_t n_tok, const int64_t *logit_tokens", "const int64_t *logit_tokens, int64_t n_tok",
     "gpt2lab_forward's arguments differ"),  # two arguments swapped: a compiler would not see it
    ("int64_t max_seq,\n", "int64_t max_len,\n", "gpt2lab_forward's arguments differ"),  # renamed
    ("float eps,", "double eps,", "gpt2lab_forward's arguments differ"),
    ("int64_t *picked)", "int64_t *picked, int n_threads)", "gpt2lab_inverse_cdf's arguments differ"),
    ("void gpt2lab_row_totals(", "int gpt2lab_row_totals(", "gpt2lab_row_totals returns int in kernels.c"),
    ("int gpt2lab_has_avx2(void)", "int gpt2lab_uses_avx2(void)", "kernels.c exports gpt2lab_uses_avx2"),
    ("static void heap_sift_down(", "void heap_sift_down(", "kernels.c exports heap_sift_down"),
    ("float *k_cache, *v_cache;", "float *v_cache, *k_cache;", "struct gpt2lab_layer differs"),
    ("    int64_t kind;\n", "    int kind;\n", "struct gpt2lab_matrix differs"),
    ("KIND_BF16 = 2", "KIND_BF16 = 3", "KIND_BF16 is 3 in kernels.c"),
    ("EPILOGUE_NONE, EPILOGUE_ADD, ", "EPILOGUE_NONE, ", "EPILOGUE_GELU_TANH is 1 in kernels.c"),
])
def test_every_departure_of_the_c_source_from_the_table_is_found(before, after, found):
    source = kernels.SOURCE.read_text(encoding="utf-8")
    assert source.count(before) == 1
    problems = abi.differences(source.replace(before, after))
    assert any(found in problem for problem in problems), problems


@pytest.mark.skipif(build.compiler() is None, reason="no C compiler here")
def test_a_source_that_departs_from_the_table_is_never_built(tmp_path, monkeypatch, caplog):
    """The library would be called with a signature it does not have: no build, a warning saying what differs."""
    source = tmp_path / "kernels.c"
    source.write_text(kernels.SOURCE.read_text(encoding="utf-8").replace("float eps,", "double eps,"))
    monkeypatch.setattr(build, "SOURCE", source)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="gpt2lab.kernels"):
        assert build.build() is None
    assert "kernels/abi.py disagree" in caplog.text and "gpt2lab_forward's arguments differ" in caplog.text
    assert not list(tmp_path.glob("cache/**/*.*"))  # no library, and no .failed note blaming the compiler


def test_kernels_build_where_there_is_a_compiler():
    """CI has gcc: the kernels must build there, or every other test here would test only the fallback."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert kernels.available()
        assert next(kernels.cache_dir().glob("gpt2lab_kernels_*.so"))


def _weights(kind: str, n_out: int, n_in: int, gen: torch.Generator):
    """(weight as the kernel reads it, scales or None, the fp64 reference of what it stands for)."""
    from gpt2lab.model.quantize import quantize_weight

    w = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
    if kind == "fp32":
        return w, None, w.double()
    stored, scales = quantize_weight(w, kind)
    if kind == "int4":  # packed: q * its group's scale
        group = kernels.INT4_GROUP_SIZE
        per_input = scales.double().repeat_interleave(group, 1)[:, :n_in]
        return stored, scales, unpack_int4(stored, n_in).double() * per_input
    ref = stored.double() * scales.double()[:, None] if scales is not None else stored.double()
    return stored, scales, ref


@needs_kernels
@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16", "int4"])
@pytest.mark.parametrize("n_out,n_in", [(1, 1), (7, 13), (5, 768), (1001, 64), (67, 3072), (33, 7), (24, 40),
                                         (9, 4133)])
def test_linear_matches_a_float_reference_and_every_row_is_independent(kind, n_out, n_in):
    """Awkward shapes (odd sizes, a k % 8 and k % 16 tail, more than one 2048-long integer chunk) at
    1..16 rows and more: fp32/bf16 within fp32 rounding of an fp64 product with the (dequantized) weight;
    int8 and int4 (packed, groups of 32 and a partial last one) bit for bit what int8_linear / int4_linear (the
    PyTorch twins) compute and within the bound their int16 activations allow; each row bit-identical to the
    same row computed alone."""
    gen = torch.Generator().manual_seed(n_out * 7 + n_in)
    w, scales, ref_w = _weights(kind, n_out, n_in, gen)
    b = torch.randn(n_out, generator=gen)
    x = torch.randn(37, n_in, generator=gen) * torch.rand(37, 1, generator=gen) * 8  # rows of different scales
    full = kernels.linear(x, w, b, scales, n_in)  # 37 rows: the many-row tiles
    want = (x.double() @ ref_w.T + b.double())
    if kind in ("int8", "int4"):
        twin = int8_linear(x, w, scales, b) if kind == "int8" else int4_linear(x, w, scales, n_in, b)
        assert torch.equal(full, twin)
        # |x - q * s| <= s / 2 per element (s = max|x| / 32767), so the product moves by at most
        # s / 2 * sum|w_row|; plus fp32 rounding of the result
        bound = x.abs().amax(1, keepdim=True).double() / 32767 / 2 * ref_w.abs().sum(1) + 1e-5 * want.abs() + 1e-6
        assert ((full.double() - want).abs() <= bound).all()
    else:
        torch.testing.assert_close(full, want.float(), rtol=1e-5, atol=1e-5)
    alone = [kernels.linear(x[i:i + 1], w, b, scales, n_in) for i in range(16)]
    for rows in (1, 2, 3, 5, 8, 16):
        got = kernels.linear(x[:rows, None], w, None if rows == 3 else b, scales, n_in)  # any leading shape
        assert got.shape == (rows, 1, n_out)
        want = torch.cat(alone[:rows]) if rows != 3 else torch.cat(alone[:3]) - b
        if rows == 3:  # no bias: compare with the reference instead
            torch.testing.assert_close(got[:, 0], (x[:3].double() @ ref_w.T).float(), rtol=1e-5,
                                       atol=1e-5 if kind not in ("int8", "int4") else 2e-3)
        else:
            assert torch.equal(got[:, 0], want)  # bit for bit, whatever the number of rows
    assert torch.equal(full[:16], torch.cat(alone))


@needs_kernels
def test_int8_rows_of_tiny_values_are_zero_rows_in_the_kernel_and_its_twin():
    """A row whose largest value is below 32767 / FLT_MAX (~1e-34) gets an infinite int16 factor: the twin
    returned NaN for it and the kernel packed +inf as -32768; both now take it as a zero row (the bias),
    which is what the float product rounds to."""
    gen = torch.Generator().manual_seed(0)
    w, scales, ref_w = _weights("int8", 9, 40, gen)
    b = torch.randn(9, generator=gen)
    x = torch.randn(4, 40, generator=gen) * torch.tensor([[1e-36], [1e-40], [1e-30], [1.0]])
    got = kernels.linear(x, w, b, scales)
    assert torch.equal(got, int8_linear(x, w, scales, b)) and not got.isnan().any()
    assert torch.equal(got[:2], b.expand(2, 9))
    torch.testing.assert_close(got, (x.double() @ ref_w.T + b.double()).float(), rtol=1e-4, atol=1e-4)


DECODER_SHAPES = {
    # awkward sizes on purpose: head_dim 12, an MLP width and vocabulary that are not multiples of 4 or 8
    "odd": dict(n_layer=2, n_head=3, n_embd=36, n_inner=70, vocab_size=1001, n_positions=64,
                scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-3),
    "untied": dict(n_layer=2, n_head=2, n_embd=64, n_positions=64, tie_word_embeddings=False),
    "relu": dict(n_layer=1, n_head=2, n_embd=40, n_positions=64, activation_function="relu"),
    "silu": dict(n_layer=1, n_head=2, n_embd=40, n_positions=64, activation_function="silu"),
}


@needs_kernels
@pytest.mark.parametrize("quantization", [None, "int8", "bf16", "int8-head", "int4"])
@pytest.mark.parametrize("shape", list(DECODER_SHAPES))
def test_the_kernel_forward_matches_the_torch_forward(shape, quantization, tmp_path):
    """Ragged prefills into different cache rows, then ragged decode steps: the one-call forward equals
    the model's own PyTorch code (uncached) for fp32, int8, int4 and bf16 weights, and with an int8 embedding
    and LM head too."""
    ckpt = make_hf_checkpoint(tmp_path, seed=3, **DECODER_SHAPES[shape])
    if quantization == "int8-head":
        model = quantize_(load_model(ckpt), "int8", lm_head="int8")
        assert model.wte.weight.dtype == torch.int8
    else:
        model = load_model(ckpt, quantization=quantization)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    lens = [20, 27, 33]
    with torch.no_grad():
        assert inference_runner(model) is not None
        full = model(ids)  # [3, 40, V], PyTorch
        model.setup_cache(max_batch=5, max_seq=40)
        for r, n in enumerate(lens):  # rows 2..4 of the cache, prefilled to different lengths
            pre = runtime.forward(model, ids[r:r + 1, :n], input_pos=torch.arange(n)[None], rows=slice(2 + r, 3 + r))
            assert (pre[0] - full[r, :n]).abs().max() < 1e-4
        for step in range(4):  # ragged decode steps
            pos = torch.tensor(lens)[:, None] + step
            logits = runtime.forward(model, ids[torch.arange(3), pos[:, 0]][:, None], input_pos=pos, rows=slice(2, 5))
            assert logits.shape == (3, 1, vocab)
            for r in range(3):
                assert (logits[r, 0] - full[r, pos[r, 0]]).abs().max() < 1e-4


@needs_kernels
def test_the_kernel_forward_refuses_what_would_read_outside_memory(tmp_path):
    model = load_model(make_hf_checkpoint(tmp_path, **DECODER_SHAPES["untied"]))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="setup_cache"):
            runtime.forward(model, torch.tensor([[1]]), input_pos=torch.tensor([[0]]))
        model.setup_cache(max_batch=2, max_seq=16)
        with pytest.raises(IndexError, match=r"token ids must be in \[0, 50257\)"):
            runtime.forward(model, torch.tensor([[50257]]), input_pos=torch.tensor([[0]]))
        with pytest.raises(ValueError, match="beyond the KV cache"):
            runtime.forward(model, torch.tensor([[1]]), input_pos=torch.tensor([[16]]))
        with pytest.raises(ValueError, match="beyond the KV cache"):
            runtime.forward(model, torch.tensor([[1], [2]]), input_pos=torch.tensor([[0], [0]]), rows=slice(1, 3))
        with pytest.raises(IndexError, match="logits_index"):
            runtime.forward(model, torch.tensor([[1, 2]]), input_pos=torch.tensor([[0, 1]]),
                            logits_index=torch.tensor([2]))


@needs_kernels
@pytest.mark.parametrize("shape", ["untied", "relu", "silu"])
@pytest.mark.parametrize("where", ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias"])
def test_a_nan_weight_before_the_activation_gives_nan_logits_as_in_torch(shape, where, tmp_path):
    """A NaN into the MLP's activation: torch's relu/silu/gelu_new keep it, and every logit comes out NaN.
    The kernels' relu was ``v > 0 ? v : 0``, which turns NaN into 0: finite logits from a broken model."""
    model = load_model(make_hf_checkpoint(tmp_path, seed=3, **DECODER_SHAPES[shape]))
    with torch.no_grad():
        dict(model.named_parameters())[where].view(-1)[0] = float("nan")
        ids = torch.tensor([[1, 2, 3]])
        assert model(ids).isnan().all()  # PyTorch
        model.setup_cache(max_batch=1, max_seq=8)
        assert inference_runner(model) is not None
        assert runtime.forward(model, ids, input_pos=torch.arange(3)[None]).isnan().all()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


GREEDY = """
    import torch
    import gpt2lab
    from gpt2lab import kernels
    from gpt2lab.runtime import inference_runner
    gen = gpt2lab.load({ckpt!r})
    with torch.no_grad():
        print(kernels.available(), type(inference_runner(gen.model)).__name__)
    print(gen.generate(["Hello there", "A longer prompt about the sea"], max_new_tokens=10, temperature=0,
                       ignore_eos=True)[1].token_ids)
"""


def test_switched_off_kernels_fall_back_to_torch_with_the_same_tokens(tiny_checkpoint):
    on = run_python(GREEDY.format(ckpt=str(tiny_checkpoint)))
    off = run_python(GREEDY.format(ckpt=str(tiny_checkpoint)), GPT2LAB_CPU_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[0] == "False NoneType"  # GPT2's PyTorch code
    assert on.stdout.splitlines()[0] == ("True KernelRunner" if kernels.available() else "False NoneType")
    assert on.stdout.splitlines()[1] == off.stdout.splitlines()[1]


def test_build_is_cached_and_a_missing_or_broken_compiler_falls_back(tmp_path):
    probe = "from gpt2lab import kernels; print(kernels.available())"
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


def test_threads_that_first_use_the_kernels_together_all_get_them():
    """The first load was not locked: threads calling in while another loaded got None (their forward and
    sampling step ran through torch's kernels instead, and a seeded sample could part from a lone run)."""
    probe = textwrap.dedent("""
        import threading
        from gpt2lab import kernels
        got, barrier = [], threading.Barrier(4)
        def first_use():
            barrier.wait()
            got.append(kernels.available())
        threads = [threading.Thread(target=first_use) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(got.count(True), kernels.available())
    """)
    out = run_python(probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["4", "True"] if kernels.available() else ["0", "False"])


def _torch_top_k(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """transformers' TopKLogitsWarper, row by row (the reference the kernel must equal)."""
    out = scores.clone()
    for row, k in zip(out, ks):
        if k:
            row.masked_fill_(row < torch.topk(row, k).values[-1], float("-inf"))
    return out


def _hard_rows(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Scores with what makes selection and sums tricky: ties, -inf, +inf, repeated maxima, rounded values."""
    scores = torch.randn(rows, vocab, generator=gen) * 3
    scores[0] = torch.round(scores[0])  # many ties
    scores[1, 1::3] = float("-inf")  # masked by an earlier processor
    scores[2, :7] = 5.0  # a tie at the top
    if rows > 3:
        scores[3, min(5, vocab - 1)] = float("inf")
    return scores


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 100, 50257])
def test_the_top_k_kernel_equals_torch_topk_then_masked_fill(vocab):
    gen = torch.Generator().manual_seed(vocab)
    scores = _hard_rows(gen, 5, vocab)
    for ks in ([1] * 5, [min(50, vocab)] * 5, [vocab, 0, 1, min(3, vocab), min(40, vocab)], [0] * 5):
        out = scores.clone()
        assert kernels.top_k_(out, ks)
        torch.testing.assert_close(out, _torch_top_k(scores, ks), rtol=0, atol=0, equal_nan=True)


@needs_kernels
def test_the_top_k_kernel_leaves_a_nan_row_to_torch():
    scores = torch.randn(2, 300)
    scores[1, 200] = float("nan")
    out = scores.clone()
    assert not kernels.top_k_(out, [5, 5])
    torch.testing.assert_close(out, scores, rtol=0, atol=0, equal_nan=True)  # untouched


@needs_kernels
def test_the_sampling_kernels_refuse_arguments_that_would_read_outside_memory():
    """k beyond the row (or negative) made the C top-k read past the row; too few targets or a non-contiguous
    matrix made the inverse CDF read past its arrays."""
    scores = torch.randn(2, 10)
    for ks in ([11, 1], [1, -1], [3, 10**6]):
        out = scores.clone()
        with pytest.raises(ValueError, match="0 <= k <= 10"):
            kernels.top_k_(out, ks)
        assert torch.equal(out, scores)
    probs = scores.softmax(-1)
    with pytest.raises(ValueError, match="one target per row"):
        kernels.inverse_cdf(probs, [0.5])
    with pytest.raises(ValueError, match="contiguous CPU fp32"):
        kernels.inverse_cdf(probs.t(), [0.5] * 10)
    with pytest.raises(ValueError, match="contiguous CPU fp32"):
        kernels.inverse_cdf(probs.double(), [0.5, 0.5])
    assert kernels.inverse_cdf(probs, [0.0, 0.999]).tolist()[0] == 0


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 9, 1000, 50257])
def test_the_inverse_cdf_kernel_equals_cumsum_and_searchsorted(vocab):
    gen = torch.Generator().manual_seed(vocab + 1)
    scores = _hard_rows(gen, 4, vocab)
    scores[3] = torch.randn(vocab, generator=gen)  # no inf: a full row
    for ks in ([min(50, vocab)] * 4, [0] * 4):
        probs = _torch_top_k(scores, ks).softmax(-1)
        cdf = probs.cumsum(-1, dtype=torch.float64)
        assert torch.equal(kernels.row_totals(probs), cdf[:, -1])
        # the draws that decide a row: 0, every cdf step exactly (right=True: the next token), just below
        # and above steps, and the largest target allowed
        for j in range(min(vocab, 60)):
            targets = torch.stack([cdf[r, min(j, vocab - 1)] for r in range(4)])
            for t in (targets, torch.nextafter(targets, torch.zeros(())), torch.nextafter(targets, cdf[:, -1]),
                      torch.zeros(4, dtype=torch.float64), torch.nextafter(cdf[:, -1], torch.zeros(()))):
                t = torch.minimum(t, torch.nextafter(cdf[:, -1], torch.zeros(())))
                expected = torch.searchsorted(cdf, t[:, None], right=True)[:, 0]
                assert torch.equal(kernels.inverse_cdf(probs, t.tolist()), expected), (j, t)


@needs_kernels
@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16", "int4"])
def test_linear_refuses_a_wrong_input_width_and_takes_zero_rows(kind):
    """A mismatched x once made the C code see zero rows and die of SIGFPE, taking the process with it."""
    gen = torch.Generator().manual_seed(0)
    weight, scales, _ = _weights(kind, 768, 3072, gen)
    with pytest.raises(ValueError, match="x has 768 features"):
        kernels.linear(torch.randn(1, 768), weight, torch.zeros(768), scales, 3072)
    assert kernels.linear(torch.randn(0, 3072), weight, torch.zeros(768), scales, 3072).shape == (0, 768)
    assert kernels.linear(torch.randn(2, 0, 3072), weight, None, scales, 3072).shape == (2, 0, 768)
    if kind == "int4":  # packed bytes do not say their width: a wrong one, or no scales, would read out of bounds
        for in_features, s in ((2944, scales), (None, scales), (3072, None), (3072, scales[:, :-1])):
            with pytest.raises(ValueError, match="packed int4 weights"):
                kernels.linear(torch.randn(1, 3072), weight, None, s, in_features)


_PATHS = [isa for isa in build.cpu_isas() if isa != "native"]


@needs_kernels
def test_the_best_path_this_cpu_runs_is_loaded_by_default():
    """Without GPT2LAB_KERNELS_ISA the kernels load the first of build.cpu_isas(): AVX-512 where the CPU has
    it (and VNNI), not the AVX2 code every CPU of the last decade would get from a fixed build."""
    if os.environ.get(kernels.ISA_ENV, "auto") not in ("", "auto"):
        pytest.skip(f"{kernels.ISA_ENV} forces a path in this run")
    assert kernels.isa() == {"native": "avx2"}.get(build.cpu_isas()[0], build.cpu_isas()[0]) or (
        build.cpu_isas()[0] == "native" and kernels.isa() in ("avx512", "avx2"))


@needs_kernels
@pytest.mark.parametrize("isa", _PATHS)
def test_every_path_this_cpu_runs_gives_the_same_int8_products_and_batch_invariance(isa):
    """Each instruction-set path present here (and the portable one, forced by GPT2LAB_KERNELS_ISA) in a
    process of its own runs the linear and forward tests above: int8 and int4 products bit for bit those of
    the PyTorch twins int8_linear / int4_linear (so bit-identical across paths), fp32/bf16 within rounding of
    fp64, every row bit-identical alone or batched, the whole forward equal to torch's."""
    if os.environ.get(kernels.ISA_ENV):
        pytest.skip("already inside a forced-path run")
    env = {**os.environ, kernels.ISA_ENV: isa}
    probe = subprocess.run([sys.executable, "-c", "from gpt2lab import kernels; print(kernels.isa())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == isa, probe.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{__file__}::"
         "test_linear_matches_a_float_reference_and_every_row_is_independent", f"{__file__}::"
         "test_the_kernel_forward_matches_the_torch_forward"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_auto_threads_follow_the_load_and_a_pinned_count_is_kept():
    """ThreadTuner, fed forward times like those measured with one core busy (2 threads slower than 1) and
    then idle again (2 faster): it settles on the faster count each time, re-measures the other only one
    forward in about EXPLORE_EVERY (fewer the slower it is), and keeps phases apart (batch-1 decode and
    prefill may want different counts). --threads N (set_threads(N)) pins N with nothing to time."""
    from gpt2lab.runtime.threads import EXPLORE_EVERY, ThreadTuner, set_threads

    if ThreadTuner.most() < 2:
        pytest.skip("one usable CPU: auto has nothing to choose")
    most = ThreadTuner.most()
    tuner = ThreadTuner()

    def run(calls: int, cost: dict[int, float], prefill: bool = False) -> list[int]:
        chosen = []
        for _ in range(calls):
            threads, key = tuner.choose(1 if not prefill else 64, prefill)
            assert key is not None and 1 <= threads <= most
            tuner.record(key, threads, cost.get(threads, 1.0))
            chosen.append(threads)
        return chosen

    busy = {1: 9.2, most: 14.5}  # the seconds: one core taken by another process
    idle = {1: 8.7, most: 6.0}
    settled = run(8 * EXPLORE_EVERY, busy)[-4 * EXPLORE_EVERY:]
    assert 1 <= 4 * EXPLORE_EVERY - settled.count(1) <= 4  # the other count only re-measured, now and then
    # torch's own operators of the step (sampling) follow the chosen count; the cap stays what torch had
    assert torch.get_num_threads() == settled[-1] and ThreadTuner.most() == most
    assert run(EXPLORE_EVERY * 6, idle)[-EXPLORE_EVERY:].count(most) >= EXPLORE_EVERY - 1  # the load went away
    # 2 threads 16x slower (a machine loaded far beyond its cores): re-measured 16x less often
    assert run(EXPLORE_EVERY * 40, {1: 1.0, most: 16.0})[-EXPLORE_EVERY * 32:].count(most) <= 3
    assert run(EXPLORE_EVERY * 2, {1: 1.0, most: 0.4}, prefill=True)[-EXPLORE_EVERY:].count(most) >= EXPLORE_EVERY - 1
    try:
        set_threads(1)
        assert ThreadTuner().choose(1, False) == (1, None) and ThreadTuner.most() == 1
        with pytest.raises(ValueError, match=r"threads must be an integer in \[1, 1024\]"):
            set_threads(0)
    finally:
        set_threads("auto")
        torch.set_num_threads(most)
    assert ThreadTuner().choose(1, False)[1] is not None


@needs_kernels
def test_the_thread_count_never_changes_a_result(tmp_path):
    """Blocks of a product go to whichever thread is free (so a descheduled thread's share is taken by the
    others): logits are bit-identical with 1 thread, 2, or 3, for fp32 and int8 weights, prefill and decode."""
    from gpt2lab.runtime.threads import set_threads

    before = torch.get_num_threads()
    ckpt = make_hf_checkpoint(tmp_path, seed=5, **DECODER_SHAPES["untied"])
    results = {}
    try:
        for quantization in (None, "int8"):
            model = load_model(ckpt, quantization=quantization)
            ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
            for threads in (1, 2, 3):
                set_threads(threads)
                with torch.no_grad():
                    model.setup_cache(max_batch=3, max_seq=16)
                    pre = runtime.forward(model, ids, input_pos=torch.arange(12)[None].expand(3, 12))
                    step = runtime.forward(model, ids[:, :1], input_pos=torch.full((3, 1), 12))
                results[quantization, threads] = (pre, step)
    finally:
        set_threads("auto")
        torch.set_num_threads(before)
    for (quantization, _threads), (pre, step) in results.items():
        assert torch.equal(pre, results[quantization, 1][0]) and torch.equal(step, results[quantization, 1][1])
