"""Generation speed on CPU: gpt2lab (fp32, int8) against transformers, CTranslate2 and llama.cpp (issue 18).

    PYTHONPATH=src python benchmarks/generate.py                       # everything available, a few minutes
    PYTHONPATH=src python benchmarks/generate.py --contenders gpt2lab gpt2lab-int8 ct2 ct2-int8 --batches 1
    PYTHONPATH=src python benchmarks/generate.py --models 124m --repeats 5 --threads 2

Models: randomly initialised GPT-2 124M and a GPT-2 medium-shaped 355M (``transformers.GPT2Config``
defaults / 24 layers x 1024), saved by transformers in Hugging Face layout under
``~/.cache/gpt2lab/bench/`` on first use. Every contender samples ``--new-tokens`` tokens with top_k=50
from 16-token prompts (EOS ignored, so every row makes them all), fp32 activations, ``--threads`` threads.
Runs alternate between the contenders (a burst of load elsewhere hits all alike); best and median count.

Contenders (each skipped with a note when its package is missing):
- ``gpt2lab``, ``gpt2lab-int8``, ``gpt2lab-bf16``: ``gpt2lab.load(dir[, quantization=...])`` then ``generate``
  (no other call: this is what every user gets);
- ``transformers``: ``GPT2LMHeadModel.generate`` (124M only: it is the slow reference);
- ``ct2``, ``ct2-int8``: CTranslate2 ``float32`` / ``int8_float32`` (``pip install ctranslate2``), converted with
  ``TransformersConverter``, ``Generator.generate_batch(..., sampling_topk=50)``;
- ``llama-f32``, ``llama-q8``: llama.cpp through ``llama-cpp-python`` at batch 1 (``Llama.generate``), on GGUF files
  converted by llama.cpp's ``convert_hf_to_gguf.py`` (``--outtype f32`` / ``q8_0``): pass ``--gguf-dir DIR`` holding
  ``<model>-f32.gguf`` and ``<model>-q8_0.gguf`` (e.g. ``gpt2-124m-random-q8_0.gguf``), or ``--convert-script PATH``
  to convert them here (``pip install gguf``).

Printed per model and batch: tokens/s best (median) per contender, the ratios the issue's bars name, and at
batch 1 the fraction of the memory-bandwidth limit reached (a decode step streams every weight once: the
measured bandwidth divided by the bytes of weights per token, int8 and fp32).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab" / "bench"
MODELS = {"124m": dict(), "355m": dict(n_embd=1024, n_layer=24, n_head=16)}
PROMPT_LEN, TOP_K = 16, 50
# common words that are one GPT-2 token each with a leading space: prompts of exactly PROMPT_LEN tokens
WORDS = ("the cat dog house river old new city light water people time year world day man woman child "
         "music story night road king book small great long green black white red field tree").split()
ALL = ("gpt2lab", "gpt2lab-int8", "gpt2lab-bf16", "transformers", "ct2", "ct2-int8", "llama-f32", "llama-q8")
DEFAULT = ("gpt2lab", "gpt2lab-int8", "transformers", "ct2", "ct2-int8", "llama-f32", "llama-q8")


def ensure_checkpoint(name: str) -> Path:
    """The random checkpoint ``name`` (HF's own save_pretrained), created unless already there."""
    from gpt2lab.checkpoints import write_atomic_dir
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    directory = BENCH_DIR / f"gpt2-{name}-random"
    if (directory / "config.json").is_file():
        return directory
    from transformers import GPT2Config, GPT2LMHeadModel

    print(f"creating a random GPT-2 {name} checkpoint in {directory} ...", flush=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**MODELS[name])).eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for f in ("vocab.json", "merges.txt"):
            (tmp / f).write_bytes((gpt2_tokenizer_dir() / f).read_bytes())

    return write_atomic_dir(directory, fill)


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tokenizer.encode("The" + "".join(" " + rng.choice(WORDS) for _ in range(PROMPT_LEN - 1)))
        assert len(ids) == PROMPT_LEN
        out.append(ids)
    return out


def memory_bandwidth_gbs(rounds: int = 5) -> float:
    """Read bandwidth now (GB/s): best time to sum a 512 MB tensor, far larger than any cache."""
    x = torch.ones(128 * 2**20)
    x.sum()
    best = min(_timed(x.sum) for _ in range(rounds))
    return x.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- contenders: each returns run(prompts, new_tokens) -> token ids per prompt, or raises SkipContender -----
class SkipContender(Exception):
    """A contender that cannot run here (its package or files are missing)."""


def gpt2lab_runner(directory: Path, quantization: str | None):
    import gpt2lab

    gen = gpt2lab.load(directory, quantization=quantization)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        texts = [gen.tokenizer.decode(p) for p in prompts]
        outs = gen.generate(texts, max_new_tokens=new, top_k=TOP_K, temperature=1.0, ignore_eos=True, seed=1234)
        return [o.token_ids for o in outs]

    run.weight_bytes = sum(t.numel() * t.element_size() for n, t in gen.model.state_dict(keep_vars=True).items()
                           if "wpe" not in n) if quantization is None else _quantized_bytes(gen.model)
    return run


def _quantized_bytes(model) -> int:  # noqa: ANN001
    """Bytes a decode step streams: the quantized weights and scales, plus the float parameters."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wpe" not in n)
    return total + sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".kv_cache." not in n)


def transformers_runner(directory: Path):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(directory).float().eval()

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=True, top_k=TOP_K, temperature=1.0, pad_token_id=hf.config.eos_token_id)
        return out[:, ids.shape[1]:].tolist()

    return run


def ct2_runner(directory: Path, compute_type: str, threads: int):
    try:
        import ctranslate2
    except ImportError as exc:
        raise SkipContender("ctranslate2 is not installed (pip install ctranslate2)") from exc
    from gpt2lab.tokenizer import Tokenizer

    quant = "int8" if compute_type.startswith("int8") else None
    out_dir = BENCH_DIR / f"{directory.name}-ct2-{quant or 'float32'}"
    if not (out_dir / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(str(directory)).convert(str(out_dir), quantization=quant,
                                                                             force=True)
    gen = ctranslate2.Generator(str(out_dir), device="cpu", compute_type=compute_type, intra_threads=threads)
    tok = Tokenizer.from_dir(directory)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        start = [[tok.id_to_token(i) for i in p] for p in prompts]
        res = gen.generate_batch(start, max_length=new, min_length=new, sampling_topk=TOP_K, sampling_temperature=1.0,
                                 include_prompt_in_result=False, return_scores=False)
        return [r.sequences_ids[0] for r in res]

    return run


def llama_runner(directory: Path, outtype: str, threads: int, gguf_dir: Path | None, convert: Path | None):
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise SkipContender("llama-cpp-python is not installed (pip install llama-cpp-python: a source build)") \
            from exc
    gguf = (gguf_dir or BENCH_DIR) / f"{directory.name}-{outtype}.gguf"
    if not gguf.is_file():
        if convert is None:
            raise SkipContender(f"no {gguf} (give --gguf-dir, or --convert-script: llama.cpp's "
                                f"convert_hf_to_gguf.py)")
        subprocess.run([sys.executable, str(convert), str(directory), "--outtype", outtype, "--outfile", str(gguf)],
                       check=True)
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False, seed=1234)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        assert len(prompts) == 1, "llama.cpp runs at batch 1 here"
        llm.reset()
        out = []
        for token in llm.generate(prompts[0], top_k=TOP_K, top_p=1.0, temp=1.0, reset=True):
            out.append(token)
            if len(out) == new:
                break
        return [out]

    return run


def build(name: str, directory: Path, args) -> Callable:  # noqa: ANN001
    if name == "gpt2lab":
        return gpt2lab_runner(directory, None)
    if name.startswith("gpt2lab-"):
        return gpt2lab_runner(directory, name.split("-", 1)[1])
    if name == "transformers":
        return transformers_runner(directory)
    if name in ("ct2", "ct2-int8"):
        return ct2_runner(directory, "int8_float32" if name == "ct2-int8" else "float32", args.threads)
    return llama_runner(directory, "q8_0" if name == "llama-q8" else "f32", args.threads, args.gguf_dir,
                        args.convert_script)


def measure(runners: dict[str, Callable], prompts: list[list[int]], new: int, repeats: int) -> dict:
    """tokens/s (best, median) per contender, runs alternating."""
    for name, run in runners.items():  # warm-up: allocations, kernels, primitives; and a length check
        got = run(prompts, 8)
        assert all(len(t) == 8 for t in got), f"{name} made {[len(t) for t in got]} tokens, not 8"
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(_timed(lambda run=run: run(prompts, new)))
    tokens = len(prompts) * new
    return {k: (tokens / min(v), tokens / statistics.median(v)) for k, v in times.items()}


def _ratio(rates: dict, a: str, b: str, what: str) -> str | None:
    if a in rates and b in rates:
        return f"{what} {rates[a][0] / rates[b][0]:.2f}x"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--contenders", nargs="+", choices=ALL, default=list(DEFAULT), metavar="NAME",
                    help=f"which to time (default: {' '.join(DEFAULT)}; choices: {' '.join(ALL)})")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes for the 124M model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contender (best and median count)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf-dir", type=Path, help="folder with <model>-f32.gguf / <model>-q8_0.gguf for llama.cpp")
    ap.add_argument("--convert-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py, to make the GGUF files")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from gpt2lab.model import kernels

    kernels.library()
    print(f"torch {torch.__version__}, {args.threads} threads; gpt2lab's C kernels: "
          + ("on" + (" (AVX2/FMA)" if kernels.has_avx2() else " (portable, no AVX2)") if kernels.available()
             else "OFF (PyTorch fallback)"))
    print(f"{PROMPT_LEN}-token prompts, {args.new_tokens} new tokens, top_k={TOP_K} sampling; tokens/s best of "
          f"{args.repeats} (median), runs alternating")
    bandwidth = memory_bandwidth_gbs()
    print(f"memory read bandwidth now: {bandwidth:.1f} GB/s")
    for model in args.models:
        directory = ensure_checkpoint(model)
        names = [n for n in args.contenders if not (model != "124m" and n == "transformers")]
        runners: dict[str, Callable] = {}
        for name in names:
            try:
                runners[name] = build(name, directory, args)
            except SkipContender as exc:
                print(f"  {model}: {name} skipped: {exc}")
        batches = args.batches if model == "124m" else [1]
        for batch in batches:
            active = {n: r for n, r in runners.items() if batch == 1 or not n.startswith("llama")}
            prompts = make_prompts(__import__("gpt2lab").tokenizer.Tokenizer.gpt2(), batch, seed=batch)
            rates = measure(active, prompts, args.new_tokens, args.repeats)
            print(f"\nGPT-2 {model}, batch {batch}:")
            for name, (best, median) in rates.items():
                print(f"  {name:14s} {best:8.1f} ({median:6.1f}) tok/s")
            ratios = [_ratio(rates, "gpt2lab-int8", "llama-q8", "int8/llama.cpp q8_0"),
                      _ratio(rates, "gpt2lab-int8", "ct2-int8", "int8/CT2 int8"),
                      _ratio(rates, "gpt2lab", "llama-f32", "fp32/llama.cpp f32"),
                      _ratio(rates, "gpt2lab", "ct2", "fp32/CT2 float32"),
                      _ratio(rates, "gpt2lab", "transformers", "fp32/transformers"),
                      _ratio(rates, "gpt2lab-int8", "gpt2lab", "int8/fp32")]
            print("  ratios (best): " + ", ".join(r for r in ratios if r))
            if batch == 1:
                for name in ("gpt2lab", "gpt2lab-int8", "gpt2lab-bf16"):
                    if name in rates:
                        step = runners[name].weight_bytes
                        limit = bandwidth * 1e9 / step
                        print(f"  {name}: {step / 1e6:.0f} MB of weights per token -> bandwidth limit {limit:.0f} "
                              f"tok/s; reached {rates[name][0] / limit:.0%}")


if __name__ == "__main__":
    main()
