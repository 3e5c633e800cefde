"""Structured outputs: decode speed with and without a JSON-schema constraint, and the mask time per token.

    PYTHONPATH=src python benchmarks/structured.py                 # batch 1 and 8, a few minutes
    PYTHONPATH=src python benchmarks/structured.py --engines       # also llguidance against xgrammar (if installed)

Model: the random GPT-2 124M of ``benchmarks/generate.py`` with ``quantization="int8"``. Each run decodes
``--new-tokens`` tokens (EOS ignored) at temperature 1 from a 16-token prompt, ``--batches`` rows at once, once
plain and once held to a JSON Schema whose one string field must be long (so no row ends early: both runs
decode the same number of tokens); runs alternate, best of ``--repeats``. Printed per batch size: tokens/s of
each, their ratio (the bar at batch 1: constrained >= 85% of plain), and the mask time per token (llguidance's
bitmask of the rows plus applying it, measured by replaying the generated tokens through fresh matchers).
``--engines`` adds, per batch size, llguidance against xgrammar: tokenizer set-up, compile and mask time per
token over the same tokens, each engine cold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import ensure_checkpoint, make_prompts  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"],
          "additionalProperties": False}


def decode_rate(gen, prompts: list[list[int]], params) -> tuple[float, list[list[int]]]:  # noqa: ANN001
    runner = gen.runner(max_batch=len(prompts))
    ids = [runner.add(p, params) for p in prompts]
    start = time.perf_counter()
    runner.run()
    elapsed = time.perf_counter() - start
    tokens = [c.token_ids for i in ids for c in runner.completions(i)]
    return sum(len(t) for t in tokens) / elapsed, tokens


def mask_time(gen, spec, outputs: list[list[int]]) -> float:  # noqa: ANN001
    """Seconds per token of the constraint (bitmask + apply), replaying ``outputs`` through fresh matchers."""
    from gpt2lab.sampling import StructuredOutput

    transform = StructuredOutput([spec] * len(outputs), gen.config.vocab_size, gen.tokenizer)
    scores = torch.zeros(len(outputs), gen.config.vocab_size)
    steps = min(len(o) for o in outputs)
    start = time.perf_counter()
    for t in range(steps):
        transform.apply_(scores, [o[:t] for o in outputs], [0] * len(outputs))
    return (time.perf_counter() - start) / (steps * len(outputs))


def compare_engines(gen, outputs: list[list[int]]) -> None:  # noqa: ANN001
    """llguidance and xgrammar, each cold: tokenizer set-up, schema compile, and the mask time per token over
    the same generated tokens, ``len(outputs)`` matchers a step (as a batch of that many rows computes them)."""
    import json

    import llguidance as llg

    from gpt2lab.sampling.structured import StructuredOutputsParams, parser_limits
    from gpt2lab.sampling.structured import _TokenizerGrammars as TokenizerGrammars

    grammar = StructuredOutputsParams(json=SCHEMA).validate()
    steps = min(len(o) for o in outputs)
    start = time.perf_counter()
    lltokenizer = TokenizerGrammars(gen.tokenizer).lltokenizer  # a fresh one, not the cached
    setup = time.perf_counter() - start
    start = time.perf_counter()
    pristine = llg.LLMatcher(lltokenizer, grammar, log_level=0, limits=parser_limits())
    compile_s = time.perf_counter() - start
    matchers = [pristine.deep_copy() for _ in outputs]
    words = np.empty((len(outputs), (gen.tokenizer.vocab_size + 31) // 32), dtype=np.int32)
    start = time.perf_counter()
    for t in range(steps):
        for j, (m, o) in enumerate(zip(matchers, outputs)):
            m.unsafe_compute_mask_ptr(words[j].ctypes.data, words[j].nbytes)
            m.consume_token(o[t])
    per_token = (time.perf_counter() - start) / (steps * len(outputs))
    print(f"  llguidance: tokenizer {setup:.2f} s, compile {compile_s * 1e3:.1f} ms, "
          f"mask {per_token * 1e6:.1f} us/token (batch {len(outputs)})")
    try:
        start = time.perf_counter()
        import xgrammar as xgr
        from transformers import GPT2TokenizerFast

        imported = time.perf_counter() - start
    except ImportError:
        print("  xgrammar: not installed (pip install xgrammar)")
        return
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir())),
                                              vocab_size=gen.tokenizer.vocab_size)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                          separators=(", ", ": "))
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in outputs]
    bitmask = xgr.allocate_token_bitmask(len(outputs), info.vocab_size)
    start = time.perf_counter()
    for t in range(steps):
        for j, (m, o) in enumerate(zip(matchers, outputs)):
            m.fill_next_token_bitmask(bitmask, j)
            if not m.accept_token(o[t]):
                raise RuntimeError(f"xgrammar refused token {o[t]} that llguidance allowed")
    per_token = (time.perf_counter() - start) / (steps * len(outputs))
    print(f"  xgrammar:   import {imported:.2f} s, tokenizer {setup:.2f} s, compile {compile_s * 1e3:.1f} ms, "
          f"mask {per_token * 1e6:.1f} us/token (batch {len(outputs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--engines", action="store_true", help="also compare llguidance with xgrammar")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gpt2lab
    from gpt2lab.sampling import SamplingParams, StructuredOutputsParams

    gen = gpt2lab.load(ensure_checkpoint("124m"), quantization="int8")
    spec = StructuredOutputsParams(json=SCHEMA)
    plain = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    held = plain.with_(structured_outputs=spec)
    print(f"gpt2lab int8 GPT-2 124M (random), {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    for batch in args.batches:
        prompts = make_prompts(gen.tokenizer, batch)
        decode_rate(gen, prompts, held)  # warm-up (the llguidance tokenizer is built once)
        best = {"plain": 0.0, "json": 0.0}
        outputs: list[list[int]] = []
        for _ in range(args.repeats):
            for name, params in (("plain", plain), ("json", held)):
                rate, tokens = decode_rate(gen, prompts, params)
                best[name] = max(best[name], rate)
                if name == "json":
                    outputs = tokens
        ratio = best["json"] / best["plain"]
        bar = "" if batch != 1 else f"  (bar >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'})"
        print(f"batch {batch}: plain {best['plain']:.1f} tok/s, json-schema {best['json']:.1f} tok/s, "
              f"ratio {ratio:.3f}{bar}; mask time {mask_time(gen, spec, outputs) * 1e6:.0f} us/token")
        if args.engines:
            compare_engines(gen, outputs)


if __name__ == "__main__":
    main()
