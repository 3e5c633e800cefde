"""Perplexity throughput: gpt2lab against the Hugging Face guide's loop run with transformers.

Same random GPT-2 (saved by transformers), same text, same block size and stride. Prints the
perplexity each gets (they must agree to 1e-4), tokens scored per second, and the speed ratio.

    PYTHONPATH=src python benchmarks/eval.py [--layers 6 --embd 384 --block 512 --tokens 6000]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def guide_loop(model, input_ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The guide's loop ("Perplexity of fixed-length models"), weighting each window's mean loss by
    the number of tokens it averaged over (the guide's ``num_valid_tokens - batch_size`` is one short
    for later windows when stride < max_length; see docs/evaluation.md)."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss
        count = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * count
        n_tokens += count
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def corpus(tokenizer, n_tokens: int) -> str:
    """Deterministic text of about ``n_tokens`` tokens: this repository's own sources and docs."""
    parts, count = [], 0
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        count += len(tokenizer.encode(text))
        if count >= n_tokens:
            break
    ids = tokenizer.encode("\n\n".join(parts))[:n_tokens]
    return tokenizer.decode(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--embd", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--block", type=int, default=512, help="n_positions and block size")
    ap.add_argument("--tokens", type=int, default=6000, help="length of the text in tokens")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (best is reported)")
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    import gpt2lab
    from gpt2lab.evaluation import perplexity
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    tmp = Path(tempfile.mkdtemp(prefix="gpt2lab-bench-eval-"))
    try:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, n_positions=args.block)
        hf = GPT2LMHeadModel(config).eval()
        hf.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(gpt2_tokenizer_dir() / name, tmp / name)
        tok = GPT2TokenizerFast.from_pretrained(tmp)
        gen = gpt2lab.load(tmp)  # as `gpt2lab eval perplexity` loads it
        text = corpus(gen.tokenizer, args.tokens)
        input_ids = tok(text, return_tensors="pt").input_ids
        print(f"model: {args.layers} layers, {args.embd} dim, context {args.block}, "
              f"{hf.num_parameters() / 1e6:.1f}M parameters; text: {input_ids.size(1)} tokens; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for stride in (args.block, args.block // 2):
            # warm up both on a short prefix
            guide_loop(hf, input_ids[:, :args.block + 1], args.block, stride)
            perplexity(text[:2000], model=gen, block_size=args.block, stride=stride)
            hf_times, ours_times = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                hf_ppl, hf_tokens = guide_loop(hf, input_ids, args.block, stride)
                hf_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ours = perplexity(text, model=gen, block_size=args.block, stride=stride)
                ours_times.append(time.perf_counter() - t0)
            assert ours.tokens == hf_tokens, (ours.tokens, hf_tokens)
            rel = abs(ours.perplexity - hf_ppl) / hf_ppl
            hf_tps, ours_tps = hf_tokens / min(hf_times), ours.tokens / min(ours_times)
            print(f"block {args.block} stride {stride}: perplexity transformers {hf_ppl:.4f} gpt2lab "
                  f"{ours.perplexity:.4f} (rel diff {rel:.1e}); tokens/s transformers {hf_tps:,.0f} gpt2lab "
                  f"{ours_tps:,.0f}; speed ratio gpt2lab/transformers {ours_tps / hf_tps:.2f}x")
            assert rel < 1e-4
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
