"""Generation speed: gpt2lab against transformers on GPT-2 124M, fp32, on CPU (issue 3's benchmark).

    PYTHONPATH=src python benchmarks/generate.py [--repeats 3] [--threads 2] [--skip-plain]

A randomly initialised GPT-2 124M (``transformers.GPT2Config()`` defaults, saved by transformers in
Hugging Face layout) is created once in ``~/.cache/gpt2lab/bench/gpt2-124m-random`` (or ``--model``)
and loaded by both libraries in the same process. Both sample 128 new tokens with top_k=50 from
16-token prompts at batch 1 and 8 (EOS ignored, so every row makes 128 tokens); gpt2lab through its
public API (``Generator.generate``). Runs alternate between the libraries and the best of
``--repeats`` counts, so load from other processes on a shared machine hits both alike.
Set GPT2LAB_CPU_KERNELS=0 to time the fallback without gpt2lab's C kernels.
Also printed: prefill time for a 512-token prompt, the fraction of the memory-bandwidth limit reached
at batch 1 (every decode step streams all weights once), and a greedy parity check.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab" / "bench" / "gpt2-124m-random"
PROMPT_LEN, NEW_TOKENS, TOP_K, PREFILL_LEN = 16, 128, 50, 512
# common words that are one GPT-2 token each with a leading space: prompts of exactly PROMPT_LEN tokens
WORDS = ("the cat dog house river old new city light water people time year world day man woman child "
         "music story night road king book small great long green black white red field tree").split()


def ensure_checkpoint(directory: Path) -> Path:
    """Create the random 124M checkpoint (HF's own save_pretrained) unless it is already there."""
    from gpt2lab.checkpoints import write_atomic_dir
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    if (directory / "config.json").is_file():
        return directory
    from transformers import GPT2Config, GPT2LMHeadModel

    print(f"creating a random GPT-2 124M checkpoint in {directory} ...", flush=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt"):
            (tmp / name).write_bytes((gpt2_tokenizer_dir() / name).read_bytes())

    return write_atomic_dir(directory, fill)


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = "The" + "".join(" " + rng.choice(WORDS) for _ in range(length - 1))
        assert len(tokenizer.encode(text)) == length, text
        prompts.append(text)
    return prompts


def memory_bandwidth_gbs(rounds: int = 5) -> float:
    """Read bandwidth now (GB/s): best time to sum a 512 MB tensor, far larger than any cache."""
    x = torch.ones(128 * 2**20)
    x.sum()
    best = min(_timed(x.sum) for _ in range(rounds))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Runner:
    """The two libraries' generation calls for one batch of prompts."""

    def __init__(self, gen, hf, prompts: list[str]) -> None:
        self.gen, self.hf, self.prompts = gen, hf, prompts
        enc = gen.tokenizer.encode_batch(prompts)
        self.hf_ids = torch.tensor(enc)

    def gpt2lab(self, max_new_tokens: int = NEW_TOKENS, gen=None) -> list[list[int]]:
        outs = (gen or self.gen).generate(self.prompts, max_new_tokens=max_new_tokens, top_k=TOP_K, temperature=1.0,
                                          ignore_eos=True, seed=1234)
        assert all(len(o.token_ids) == max_new_tokens for o in outs)
        return [o.token_ids for o in outs]

    def gpt2lab_greedy(self, gen=None) -> list[list[int]]:
        outs = (gen or self.gen).generate(self.prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        return [o.token_ids for o in outs]

    def transformers(self, max_new_tokens: int = NEW_TOKENS, sample: bool = True) -> list[list[int]]:
        ids = self.hf_ids
        kw = dict(do_sample=True, top_k=TOP_K, temperature=1.0) if sample else dict(do_sample=False)
        with torch.inference_mode():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, pad_token_id=self.hf.config.eos_token_id, **kw)
        new = out[:, ids.shape[1]:]
        assert new.shape[1] == max_new_tokens
        return new.tolist()


def measure(run: Runner, plain, repeats: int) -> dict[str, tuple[float, float]]:
    """tokens/s (best, median) per contender: "hf", "ours" and, given ``plain``, "plain"."""
    run.gpt2lab(8), run.transformers(8)  # warm-up: allocations, oneDNN primitives
    times: dict[str, list[float]] = {"hf": [], "ours": [], "plain": []}
    for _ in range(repeats):  # alternate, so a burst of load elsewhere hits every contender alike
        times["hf"].append(_timed(run.transformers))
        times["ours"].append(_timed(run.gpt2lab))
        if plain is not None:
            times["plain"].append(_timed(lambda: run.gpt2lab(gen=plain)))
    tokens = len(run.prompts) * NEW_TOKENS
    return {k: (tokens / min(v), tokens / statistics.median(v)) for k, v in times.items() if v}


def _cell(rate: tuple[float, float]) -> str:
    return f"{rate[0]:8.1f} ({rate[1]:6.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="checkpoint directory (created if absent)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per library and batch size (best counts)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-plain", action="store_true", help="do not time gpt2lab without optimize_for_inference")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import GPT2LMHeadModel

    import gpt2lab
    from gpt2lab.model import kernels, optimize_for_inference

    directory = ensure_checkpoint(args.model)
    gen = gpt2lab.load(directory)
    optimize_for_inference(gen.model)  # idempotent: a no-op once generation applies it itself
    plain = None if args.skip_plain else gpt2lab.load(directory)
    if plain is not None and plain.model.inference_only:
        plain = None  # loading already optimises: nothing unoptimised to compare
    hf = GPT2LMHeadModel.from_pretrained(directory).float().eval()

    print(f"GPT-2 124M (random init, HF layout) from {directory}; fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("gpt2lab's C kernels: " + ("on" if kernels.available() else
                                     f"OFF (torch/oneDNN fallback; {kernels.DISABLE_ENV}=0 or no C compiler)"))
    print(f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, top_k={TOP_K} sampling, "
          f"best of {args.repeats} (median in brackets)")
    header = f"{'batch':>5}  {'transformers tok/s':>20}  {'gpt2lab tok/s':>20}"
    if plain is not None:
        header += f"  {'gpt2lab unoptimised':>20}"
    print(header + "  ratio (best)")
    batch1_rate = None
    for batch in args.batches:
        optimize_for_inference(gen.model, batch_size=batch)  # as `gpt2lab generate` does for `batch` prompts
        rate = measure(Runner(gen, hf, make_prompts(gen.tokenizer, batch, PROMPT_LEN, seed=batch)), plain, args.repeats)
        line = f"{batch:>5}  {_cell(rate['hf']):>20}  {_cell(rate['ours']):>20}"
        if plain is not None:
            line += f"  {_cell(rate['plain']):>20}"
        print(line + f"  {rate['ours'][0] / rate['hf'][0]:.2f}x", flush=True)
        if batch == 1:
            batch1_rate = rate["ours"][0]

    optimize_for_inference(gen.model, batch_size=1)
    long_run = Runner(gen, hf, make_prompts(gen.tokenizer, 1, PREFILL_LEN, seed=99))
    long_run.gpt2lab(1), long_run.transformers(1)
    hf_prefill = min(_timed(lambda: long_run.transformers(1)) for _ in range(args.repeats))
    our_prefill = min(_timed(lambda: long_run.gpt2lab(1)) for _ in range(args.repeats))
    print(f"prefill {PREFILL_LEN} tokens (prompt -> first token): transformers {hf_prefill * 1e3:.0f} ms, "
          f"gpt2lab {our_prefill * 1e3:.0f} ms ({hf_prefill / our_prefill:.2f}x)")

    if batch1_rate is not None:
        # one decode step reads every weight once: all parameters but the position table
        step_bytes = (gen.model.num_parameters() - gen.model.wpe.weight.numel()) * 4
        bandwidth = memory_bandwidth_gbs()
        limit = bandwidth * 1e9 / step_bytes
        print(f"memory bandwidth now {bandwidth:.1f} GB/s, {step_bytes / 1e6:.0f} MB of weights per token -> "
              f"batch-1 limit {limit:.0f} tok/s; gpt2lab reaches {batch1_rate / limit:.0%} of it "
              f"({batch1_rate / 65:.0%} of the issue's 65 tok/s estimate)")

    run = Runner(gen, hf, make_prompts(gen.tokenizer, 1, PROMPT_LEN, seed=1))
    ours, ref = run.gpt2lab_greedy()[0], run.transformers(sample=False)[0]
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    print(f"greedy parity ({NEW_TOKENS} tokens, batch-1 benchmark prompt): "
          + ("identical to transformers" if same is None else f"DIFFERS from transformers at new token {same}"))


if __name__ == "__main__":
    main()
