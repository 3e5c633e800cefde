"""Weight-only int8, int4 (and bf16): the load contract, the quality on the bundled model, checkpoints, fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab import kernels
from gpt2lab.checkpoints import load_model
from gpt2lab.evaluation import perplexity
from gpt2lab.model import QuantizedEmbedding, QuantizedLinear

from .test_kernels import run_python

HELDOUT = Path(__file__).parent / "data" / "hamlet_heldout_slice.txt"


def test_load_takes_vllm_quantization_names_and_rejects_others(tiny_checkpoint):
    gen = gpt2lab.load(tiny_checkpoint, quantization="int8")
    assert gen.quantization == "int8" and "quantization='int8'" in repr(gen)
    model = gen.model
    # the blocks in int8; the (tied) embedding and LM head in bf16 (LM_HEAD_QUANTIZATION says why)
    assert isinstance(model.wte, QuantizedEmbedding) and model.wte.weight.dtype == torch.bfloat16
    assert model.h[0].attn.c_attn.weight.dtype == torch.int8
    assert all(isinstance(m, QuantizedLinear) for b in model.h for m in (b.attn.c_attn, b.mlp.c_proj))
    assert gpt2lab.load(tiny_checkpoint).quantization is None
    assert gpt2lab.load(tiny_checkpoint, quantization="bf16").model.wte.weight.dtype == torch.bfloat16
    for bad in ("int2", "fp8", 8, ""):
        with pytest.raises(ValueError, match=r"quantization must be None or one of 'int8', 'bf16', 'int4', got"):
            gpt2lab.load(tiny_checkpoint, quantization=bad)
    assert model.num_parameters() == gpt2lab.load(tiny_checkpoint).model.num_parameters()


def test_quantized_weights_are_within_half_a_step_of_the_originals(tiny_checkpoint):
    plain = load_model(tiny_checkpoint)
    quant = load_model(tiny_checkpoint, quantization="int8")
    w = plain.h[0].mlp.c_fc.weight
    q = quant.h[0].mlp.c_fc
    assert q.scales.shape == (w.shape[0],)  # one scale per output channel
    assert ((q.dequantized() - w).abs() <= q.scales[:, None] / 2 + 1e-7).all()
    # state_dict gives the dequantized fp32 weights under nn.Linear's names
    state = quant.state_dict()
    assert set(state) == set(plain.state_dict())
    assert state["h.0.mlp.c_fc.weight"].dtype == torch.float32


def test_an_int8_model_saves_a_checkpoint_transformers_reads(tmp_path, tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    gen = gpt2lab.load(tiny_checkpoint, quantization="int8")
    out = gen.save(tmp_path / "saved")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - gen.model(ids)).abs().max() < 1e-4


def test_int8_without_the_kernels_gives_the_same_tokens(tiny_checkpoint):
    """No compiler / kernels off: the int8 model dequantizes through PyTorch, slower, same tokens."""
    code = f"""
        import gpt2lab
        gen = gpt2lab.load({str(tiny_checkpoint)!r}, quantization="int8")
        print(gen.generate(["Hello there", "A longer prompt about the sea"], max_new_tokens=10, temperature=0,
                           ignore_eos=True)[1].token_ids)
    """
    on, off = run_python(code), run_python(code, GPT2LAB_CPU_KERNELS="0")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout


def quality_report(quantization: str, model: str = "shakespeare-gpt2",
                   lm_head: str | None = None) -> tuple[float, float, int, float]:
    """``(fp32 perplexity, quantized perplexity, greedy agreement of 20, mean KL)`` on the held-out Hamlet slice:
    perplexity of ``model`` and its ``quantization`` copy (``lm_head``: quantize_'s), how many greedy 64-token
    continuations of 20 of the slice's lines are identical, and the mean KL(fp32 || quantized) of the next-token
    distributions (nats)."""
    from gpt2lab.model.quantize import quantize_

    fp32, quant = gpt2lab.load(model), gpt2lab.load(model)
    quantize_(quant.model, quantization, lm_head=lm_head)
    ppl32 = perplexity(files=[HELDOUT], model=fp32).perplexity
    pplq = perplexity(files=[HELDOUT], model=quant).perplexity
    lines = [line.strip() for line in HELDOUT.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 20]
    prompts = lines[::max(1, len(lines) // 20)][:20]
    assert len(prompts) == 20
    kw = dict(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    a = [c.token_ids for c in fp32.generate(prompts, **kw)]
    b = [c.token_ids for c in quant.generate(prompts, **kw)]
    agree = sum(x == y for x, y in zip(a, b))
    ids = torch.tensor(fp32.tokenizer.encode(HELDOUT.read_text(encoding="utf-8")))
    n = min(fp32.config.n_positions, 256)
    windows = ids[: (len(ids) // n) * n].view(-1, n)
    with torch.no_grad():
        lp32 = torch.log_softmax(fp32.model(windows), dim=-1)
        lpq = torch.log_softmax(quant.model(windows), dim=-1)
    kl = (lp32.exp() * (lp32 - lpq)).sum(-1).mean().item()
    print(f"{quantization} vs fp32 on {HELDOUT.name} ({model}): perplexity {ppl32:.3f} -> {pplq:.3f} "
          f"({pplq / ppl32 - 1:+.3%}); greedy 64-token continuations identical {agree}/20; mean KL(fp32 || "
          f"{quantization}) {kl:.2e} nats")
    return ppl32, pplq, agree, kl


@pytest.mark.slow
def test_int8_quality_on_the_bundled_model():
    """Issue 18's bars: perplexity within 1% of fp32 on the held-out Hamlet slice, greedy 64-token
    continuations of 20 prompts identical in at least 90%, and the mean KL(fp32 || int8) of the
    next-token distributions (printed; bounded here)."""
    ppl32, ppl8, agree, kl = quality_report("int8")
    assert abs(ppl8 / ppl32 - 1) < 0.01, (ppl32, ppl8)
    # Measured: 18/20 (int8 blocks, bf16 head); the two that differ part at near-ties. With an int8 head
    # (quantize_(..., lm_head="int8")) 16/20: that is why the head stays bf16 (LM_HEAD_QUANTIZATION).
    assert agree >= 18, f"{agree}/20 greedy continuations agree"
    assert kl < 5e-3


@pytest.mark.slow
def test_int4_quality_on_the_bundled_model():
    """Issue 27's int4 report (docs/performance.md): perplexity within 3% of fp32 (the bar), and the greedy
    agreement and KL printed beside int8's (bounded here by what was measured, with room)."""
    ppl32, ppl4, agree, kl = quality_report("int4")
    assert abs(ppl4 / ppl32 - 1) < 0.03, (ppl32, ppl4)
    assert agree >= 5 and kl < 1e-2, (agree, kl)


def test_int8_loads_the_same_from_safetensors_and_a_torch_pickle(tmp_path):
    from .conftest import SHAPES, make_hf_checkpoint

    safe = load_model(make_hf_checkpoint(tmp_path / "s", seed=4, **SHAPES["tiny"]), quantization="int8")
    pickled = load_model(make_hf_checkpoint(tmp_path / "b", seed=4, safe=False, **SHAPES["tiny"]), quantization="int8")
    for (name, a), (_, b) in zip(safe.state_dict().items(), pickled.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("quantization,lm_head", [("int8", None), ("int8", "int8"), ("int4", None)])
def test_a_nan_weight_gives_nan_logits_never_finite_ones(tiny_checkpoint, quantization, lm_head):
    """A NaN in a weight makes fp32 logits NaN; int8 must not turn it into finite numbers (its row's scale
    used to become 1, as for an all-zero row), with the kernels, without them (int8_linear) and in the
    embedding/head."""
    from gpt2lab.model.quantize import quantize_

    ids = torch.tensor([[464, 5822, 286, 262]])
    for name in ("h.0.mlp.c_fc.weight", "h.1.attn.c_proj.weight", "wte.weight"):
        model = load_model(tiny_checkpoint)
        with torch.no_grad():
            model.get_parameter(name)[464 if name == "wte.weight" else 3, 5] = float("nan")
        quantize_(model, quantization, lm_head=lm_head)
        model.setup_cache(max_batch=1, max_seq=8)
        with torch.no_grad():
            for logits in (model(ids), model(ids, input_pos=torch.arange(4)[None])):  # PyTorch code; the kernels
                assert logits.isnan().all(), name
    gen = gpt2lab.load(tiny_checkpoint)
    with torch.no_grad():
        gen.model.h[0].mlp.c_fc.weight[3, 5] = float("nan")
    quantize_(gen.model, quantization, lm_head=lm_head)
    with pytest.raises(RuntimeError, match="scores are NaN"):  # not token 0 over and over
        gen.generate("Hello", max_new_tokens=3, temperature=0)
    with pytest.raises((RuntimeError, ValueError), match="scores are NaN"):  # beam search returned garbage beams
        gen.generate("Hello", max_new_tokens=3, num_beams=2)


def test_perplexity_says_which_quantization_it_measured(tiny_checkpoint):
    """`gpt2lab eval perplexity --quantization int8` prints the int8 figure: the result (and --json) name it."""
    text = "To be, or not to be, that is the question. " * 4
    assert perplexity(text, model=tiny_checkpoint, quantization="int8").to_dict()["quantization"] == "int8"
    assert perplexity(text, model=tiny_checkpoint).quantization is None


def test_a_half_precision_model_object_or_adapter_base_quantizes_to_what_the_kernels_read(tmp_path, tiny_checkpoint):
    """Quantizing after loading (a transformers model object, a base with an adapter) keeps the unquantized
    tensors float32, as loading a folder does, whatever dtype says: in float16 the kernels did not run it."""
    from transformers import GPT2LMHeadModel

    from gpt2lab.checkpoints.adapters import fill_adapter_dir
    from gpt2lab.model.lora import apply_lora
    from gpt2lab.runtime import KernelRunner, inference_runner

    base = load_model(tiny_checkpoint)
    apply_lora(base, rank=2, alpha=4, targets="c_attn")
    fill_adapter_dir(base, tmp_path, str(tiny_checkpoint), "c_attn")
    for gen in (gpt2lab.load(GPT2LMHeadModel.from_pretrained(tiny_checkpoint, dtype=torch.float16),
                             quantization="int8", dtype="auto"),
                gpt2lab.load(tiny_checkpoint, adapter=tmp_path, quantization="int8", dtype="float16")):
        assert gen.model.wpe.weight.dtype == gen.model.ln_f.weight.dtype == torch.float32
        with torch.no_grad():
            assert isinstance(inference_runner(gen.model), KernelRunner) or not kernels.available()
    with pytest.raises(ValueError, match="dtype must be one of"):
        gpt2lab.load(tiny_checkpoint, quantization="int8", dtype="int4")


# -- int4 ------------------------------------------------------------------------------------------------------
def test_int4_weights_are_packed_group_wise_and_save_as_fp32(tmp_path, tiny_checkpoint):
    """Packed uint8 [out, in / 2] (padded to whole 128-input units) with one scale per group of INT4_GROUP_SIZE
    inputs; every weight rounded to the nearest of its group's levels (Q4_0's rule: the largest magnitude is
    exactly -8 steps, so the other sign reaches +7 only); state_dict gives the dequantized fp32 weights, so
    save_model writes a checkpoint transformers reads and an int4 load of it gives back the same packed weights."""
    from transformers import GPT2LMHeadModel

    from gpt2lab.model.quantize import INT4_GROUP_SIZE

    plain = load_model(tiny_checkpoint)
    gen = gpt2lab.load(tiny_checkpoint, quantization="int4")
    assert gen.quantization == "int4" and gen.model.wte.weight.dtype == torch.bfloat16  # the head as int8's
    w, q = plain.h[0].mlp.c_fc.weight, gen.model.h[0].mlp.c_fc  # [256, 64]: one partial group per row
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (256, 64)  # 64 inputs padded to one 128-input unit
    assert q.scales.shape == (256, -(-64 // INT4_GROUP_SIZE))
    proj = gen.model.h[0].mlp.c_proj  # [64, 256]: two whole units
    assert proj.weight.shape == (64, 128) and proj.scales.shape == (64, 256 // INT4_GROUP_SIZE)
    scales = q.scales.repeat_interleave(INT4_GROUP_SIZE, 1)[:, :64]
    error, steps = (q.dequantized() - w).abs(), w / scales  # a scale's sign is the opposite of its extreme's
    assert (error[steps <= 7.5] <= scales.abs()[steps <= 7.5] / 2 + 1e-7).all()  # rounded to the nearest level
    assert (error <= scales.abs() + 1e-7).all()  # at most a step where +8 steps is clamped to 7
    assert q.dequantized().abs().amax(1).eq(8 * q.scales.abs()[:, 0]).all()
    state = gen.model.state_dict()
    assert set(state) == set(plain.state_dict()) and state["h.0.mlp.c_fc.weight"].dtype == torch.float32
    out = gen.save(tmp_path / "saved")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - gen.model(ids)).abs().max() < 1e-3  # the int16 activations' rounding
    again = load_model(out, quantization="int4")
    for name, module in gen.model.named_modules():
        if isinstance(module, QuantizedLinear) and module.quantization == "int4":
            twin = again.get_submodule(name)
            assert torch.equal(module.weight, twin.weight) and torch.equal(module.scales, twin.scales), name


def test_int4_head_is_refused_and_int8_head_is_kept(tiny_checkpoint):
    from gpt2lab.model.quantize import quantize_

    with pytest.raises(ValueError, match=r"lm_head \(the token embedding and LM head\) must be None or one of 'int8', "
                                         r"'bf16', got 'int4'"):
        quantize_(load_model(tiny_checkpoint), "int8", lm_head="int4")
    model = quantize_(load_model(tiny_checkpoint), "int4", lm_head="int8")
    assert model.wte.weight.dtype == torch.int8 and model.h[0].attn.c_attn.weight.dtype == torch.uint8


def test_int4_generates_through_the_cli_and_the_same_without_the_kernels(tiny_checkpoint):
    """`gpt2lab generate --quantization int4` loads (streamed quantization) and decodes; the library with the
    kernels switched off (int4_linear, the PyTorch twin) gives the same greedy tokens."""
    import json

    from .test_cli_options import _run

    r = _run("generate", "Hello there", "--model", str(tiny_checkpoint), "--quantization", "int4", "--temperature",
             "0", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)["token_ids"]
    code = f"""
        import gpt2lab
        gen = gpt2lab.load({str(tiny_checkpoint)!r}, quantization="int4")
        print(gen.generate(["Hello there"], max_new_tokens=8, temperature=0)[0].token_ids)
    """
    on, off = run_python(code), run_python(code, GPT2LAB_CPU_KERNELS="0")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and on.stdout.strip() == str(cli) and cli


def test_int4_perplexity_is_within_3_percent_of_fp32_on_the_bundled_model():
    """Issue 27's bar, on the held-out Hamlet slice (measured: 154.17 -> 154.6, +0.3%)."""
    ppl32 = perplexity(files=[HELDOUT], model="shakespeare-gpt2").perplexity
    ppl4 = perplexity(files=[HELDOUT], model="shakespeare-gpt2", quantization="int4").perplexity
    assert abs(ppl4 / ppl32 - 1) < 0.03, (ppl32, ppl4)
