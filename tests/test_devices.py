"""Every device present: parity with transformers on the same device, greedy/beam/seeded equality,
static (CUDA-graph) decode steps equal to eager ones, training resume bit-exact.

Each test takes the ``device`` fixture (tests/conftest.py): it runs on the CPU everywhere and on CUDA
where torch sees a GPU (skipped with the reason elsewhere), so the CPU case is a real test here and the
CUDA case waits, ready, for a GPU machine (``benchmarks/gpu.sh`` runs it).
"""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab.generation.beam import beam_search
from gpt2lab.placement import resolve_device, resolve_dtype
from gpt2lab.runtime.cuda_graphs import GraphDecoder, batch_bucket, kv_bucket, static_decode
from gpt2lab.sampling import SamplingParams

from .conftest import SHAPES, make_hf_checkpoint

# bf16 keeps 8 bits of mantissa: logits of these small random models (|logit| < ~1) agree to a few 1e-2
BF16_ATOL = 5e-2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("dev"), seed=3, **SHAPES["tiny"])


def _hf(ckpt, device: str, dtype: torch.dtype = torch.float32):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(ckpt, dtype=dtype).to(device).eval()


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int4", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    else:
        expected = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float32
        assert resolve_dtype("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_match_transformers_on_the_same_device(ckpt, device, dtype):
    gen = gpt2lab.load(str(ckpt), device=device, dtype=dtype)
    assert gen.device.type == device and gen.model.wte.weight.dtype == getattr(torch, dtype)
    ref = _hf(ckpt, device, getattr(torch, dtype))
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = gen.model(ids).float()
    atol = 1e-4 if dtype == "float32" else BF16_ATOL
    torch.testing.assert_close(got, expected, atol=atol, rtol=0 if dtype == "float32" else 2e-2)


def test_greedy_and_beam_equal_transformers_on_the_same_device(ckpt, device):
    gen = gpt2lab.load(str(ckpt), device=device, dtype="float32")
    ref = _hf(ckpt, device)
    prompt = [464, 2068, 7586, 21831]
    x = torch.tensor([prompt], device=device)
    with torch.no_grad():
        hf_greedy = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        hf_beam = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, num_beams=3,
                               num_return_sequences=2, pad_token_id=0)[:, len(prompt):].tolist()
    greedy = gen.generate(gen.tokenizer.decode(prompt), max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    assert greedy.token_ids == hf_greedy
    beams = beam_search(gen.model, gen.tokenizer, prompt, SamplingParams(num_beams=3, n=2, max_new_tokens=8),
                        eos_token_id=gen.eos_token_id)
    assert [c.token_ids for c in beams] == hf_beam


def test_seeded_sampling_equal_alone_and_batched(ckpt, device):
    gen = gpt2lab.load(str(ckpt), device=device, dtype="float32")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, seed=123, ignore_eos=True, logprobs=2)
    alone = gen.generate("The quick brown fox", params)[0]
    batch = gen.generate(["A different prompt that is longer", "The quick brown fox", "x"], params)
    assert batch[1].token_ids == alone.token_ids
    assert [t.token_id for t in batch[1].logprobs] == alone.token_ids
    assert [t.logprob for t in batch[1].logprobs] == pytest.approx([t.logprob for t in alone.logprobs], abs=1e-4)
    assert "".join(gen.stream("The quick brown fox", params.with_(logprobs=None))) == alone.text


def test_bucket_sizes():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]
    assert batch_bucket(5, 6) == 6
    assert [kv_bucket(n, 1024) for n in (1, 256, 257, 1000)] == [256, 256, 512, 1024]
    assert kv_bucket(100, 128) == 128
    with pytest.raises(ValueError, match="rows must be in"):
        batch_bucket(9, 8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_decode_steps_equal_eager_ones(ckpt, device, dtype):
    """The padded static step (CUDA graphs on a GPU; the same step run eagerly on the CPU) gives the
    logits of the model's own cached forward, for ragged rows, and leaves the same KV cache."""
    gen = gpt2lab.load(str(ckpt), device=device, dtype=dtype)
    model = gen.model
    lens = [7, 3, 12]  # ragged: every row decodes at its own position
    prompts = [torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lens]
    decoder = GraphDecoder(model, use_graphs=device == "cuda")
    results = {}
    with torch.inference_mode():
        for mode in ("eager", "static"):
            model.setup_cache(8, 128)
            for row, p in enumerate(prompts):  # prefill each row
                model(torch.tensor([p], device=device), input_pos=torch.arange(len(p), device=device)[None],
                      rows=slice(row, row + 1))
            tokens, steps = [p[-1] for p in prompts], []
            positions = list(lens)
            for _ in range(5):
                if mode == "eager":
                    logits = model(torch.tensor(tokens, device=device)[:, None],
                                   input_pos=torch.tensor(positions, device=device)[:, None], rows=slice(0, 3))[:, -1]
                else:
                    logits = decoder.decode(tokens, positions)
                steps.append(logits.float().cpu())
                tokens = logits.argmax(-1).tolist()
                positions = [q + 1 for q in positions]
            results[mode] = (steps, [c.k[:3, :, :max(positions)].float().cpu().clone() for c in model.caches()])
            model.max_batch = model.max_seq = 0  # the next mode starts from a fresh cache
    atol = 1e-4 if dtype == "float32" else BF16_ATOL
    for eager, static in zip(results["eager"][0], results["static"][0]):
        torch.testing.assert_close(static, eager, atol=atol, rtol=0 if dtype == "float32" else 2e-2)
    for eager, static in zip(results["eager"][1], results["static"][1]):
        torch.testing.assert_close(static, eager, atol=atol, rtol=0 if dtype == "float32" else 2e-2)
    if device == "cuda":
        assert decoder.captures == 1  # one (batch 4, 128 slots) bucket, captured once, replayed 5 times


def test_static_decode_matches_forward_directly(ckpt, device):
    gen = gpt2lab.load(str(ckpt), device=device, dtype="float32")
    model = gen.model
    with torch.inference_mode():
        model.setup_cache(4, 128)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
        model(ids[:, :3], input_pos=torch.arange(3, device=device)[None].expand(2, 3))
        want = model(ids[:, 3:], input_pos=torch.full((2, 1), 3, device=device))[:, -1]
        got = static_decode(model, ids[:, 3], torch.full((2,), 3, device=device), 128)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_static_step_is_the_models_own_forward_and_reads_nothing_back(ckpt, device, monkeypatch):
    """static_decode runs the model's own blocks (no second copy of their arithmetic) with kv_len given, so it
    never reads the positions back to the host, the ordinary cached forward's one sync, which a CUDA graph
    cannot hold: the layout reader is never called, and on a GPU torch's sync check finds no sync at all."""
    from gpt2lab.model import gpt2 as gpt2_module

    gen = gpt2lab.load(str(ckpt), device=device, dtype="float32")
    model = gen.model
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
    calls = []
    with torch.inference_mode():
        model.setup_cache(4, 128)
        model(ids[:, :3], input_pos=torch.arange(3, device=device)[None].expand(2, 3))
        want = model(ids[:, 3:], input_pos=torch.tensor([[3], [3]], device=device))[:, -1]
        steered = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0)).to(device)
        handle = model.h[0].register_forward_hook(lambda module, args, out: calls.append(1) or out + steered)
        monkeypatch.setattr(gpt2_module, "_cache_layout", lambda *args: pytest.fail("the step read its layout"))
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = static_decode(model, ids[:, 3], torch.tensor([3, 3], device=device), 128)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            handle.remove()
        plain = static_decode(model, ids[:, 3], torch.tensor([3, 3], device=device), 128)
        with pytest.raises(ValueError, match="give input_pos"):
            model(ids, kv_len=8)
        with pytest.raises(ValueError, match="beyond the KV cache"):
            model(ids[:, 3:], input_pos=torch.tensor([[3], [3]], device=device), kv_len=129)
    assert calls == [1]  # the model's own block ran (its hook fired) and changed the result
    assert (got - want).abs().max() > 1e-3
    torch.testing.assert_close(plain, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: CUDA-graph engine runs need one")
def test_engine_with_cuda_graphs_equals_without(ckpt, monkeypatch):
    """The engine's decode steps replay CUDA graphs on a GPU; turning them off gives the same tokens."""
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    prompts = ["one", "two three four", "five six"]

    def run() -> list[list[int]]:
        gen = gpt2lab.load(str(ckpt), device="cuda", dtype="float32")
        return [c.token_ids for c in gen.generate(prompts, params)]

    with_graphs = run()
    monkeypatch.setenv("GPT2LAB_CUDA_GRAPHS", "0")
    assert run() == with_graphs


@pytest.mark.slow
def test_training_resume_is_bit_exact(tmp_path, device):
    """Stop after 4 steps, resume to 8: the weights equal an uninterrupted 8-step run, bit for bit
    (on CUDA with bf16 autocast and deterministic kernels, the trainer's defaults there)."""
    from safetensors.torch import load_file

    from gpt2lab.training import TrainConfig, train
    from gpt2lab.training.checkpoint import CheckpointDir

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")

    def cfg(out, resume=False, max_time=None):
        return TrainConfig(data=[str(corpus)], out=str(out), config="n_layer=2,n_head=2,n_embd=32,n_positions=64,"
                           "dropout=0.1", max_steps=8, batch_size=4, block_size=32, lr=2e-3, eval_every=4,
                           save_every=4, log_every=1, seed=5, device=device, progress=False, plot=False,
                           resume=resume, max_time=max_time, threads=1 if device == "cpu" else None)

    train(cfg(tmp_path / "ref"))
    first = train(cfg(tmp_path / "cut", max_time=1e-9))  # stops cleanly after its first step, checkpointed
    assert first.stopped == "max_time" and first.steps < 8
    train(cfg(tmp_path / "cut", resume=True))
    a = load_file(str(CheckpointDir(tmp_path / "ref" / "trainer").latest() / "model" / "model.safetensors"))
    b = load_file(str(CheckpointDir(tmp_path / "cut" / "trainer").latest() / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_gpu_benchmark_script_runs_with_smoke_sizes(tmp_path):
    """benchmarks/gpu.py end to end with tiny sizes on this machine: every row of the table is produced."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(root / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu", "--json",
                        str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["metric"], row["case"].split(" ")[0]) for row in rows] == [
        ("decode", "124M"), ("decode", "124M"), ("TTFT", "124M,"), ("decode", "XL"), ("decode", "XL"),
        ("train", "124M,"), ("train peak memory", "124M,"), ("serve", "124M,")]
    assert all(row["ours"] > 0 for row in rows if row["unit"] in ("tok/s", "ms"))
    assert "| decode" in r.stdout and "SMOKE" in r.stdout


def test_load_dtype_defaults(tmp_path, device):
    """No dtype: the device's default; "auto": a half-precision checkpoint keeps its dtype (as in
    transformers), a float32 one gets the device's default (bfloat16 on a GPU that has it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fp32 = make_hf_checkpoint(tmp_path / "fp32", seed=4, **SHAPES["tiny"])
    GPT2LMHeadModel(GPT2Config(**SHAPES["tiny"])).half().save_pretrained(tmp_path / "fp16")
    default = resolve_dtype("auto", resolve_device(device))
    assert gpt2lab.load(str(fp32), device=device).model.wte.weight.dtype == default
    assert gpt2lab.load(str(fp32), device=device, dtype="auto").model.wte.weight.dtype == default
    assert gpt2lab.load(str(tmp_path / "fp16"), device=device).model.wte.weight.dtype == default
    assert gpt2lab.load(str(tmp_path / "fp16"), device=device, dtype="auto").model.wte.weight.dtype == torch.float16
    assert gpt2lab.load(str(fp32), device=device, dtype="bf16").model.wte.weight.dtype == torch.bfloat16
