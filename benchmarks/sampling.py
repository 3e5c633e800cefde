"""Per-step cost of the logits pipeline + sampler vs transformers' processors + multinomial.

Not a test. GPT-2's vocabulary (50257), fp32, histories growing by one token per step. Measures the
CPU time of a step on one thread (best of the steps), which stays meaningful on a busy shared
machine where wall-clock time does not, and prints the ratio (transformers / gpt2lab: > 1 means
gpt2lab is faster).
Run: PYTHONPATH=src python benchmarks/sampling.py
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.generation import logits_process as hf

from gpt2lab.sampling import LogitsPipeline, SamplingParams, sample

V, STEPS, PROMPT = 50257, 30, 64

SETTINGS = {
    "temperature=0.8 top_k=50": dict(temperature=0.8, top_k=50),
    "top_k=50 top_p=0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p=0.9 (no top_k)": dict(temperature=0.8, top_p=0.9),
    "top_k=50 repetition_penalty=1.2": dict(top_k=50, repetition_penalty=1.2),
}


def hf_processors(p: SamplingParams) -> hf.LogitsProcessorList:
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(hf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(hf.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(hf.TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(hf.TopPLogitsWarper(p.top_p))
    return hf.LogitsProcessorList(procs)


def bench(batch: int, kwargs: dict) -> tuple[float, float]:
    params = [SamplingParams(**kwargs, seed=i) for i in range(batch)]
    logits = torch.randn(STEPS, batch, V) * 3
    prompt = torch.randint(0, V, (batch, PROMPT))

    pipe = LogitsPipeline(params, V)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    histories = prompt.tolist()
    ours = float("inf")
    for step in range(STEPS):
        start = time.process_time()
        tokens = sample(pipe(logits[step], histories, [PROMPT] * batch), params, gens)
        for h, t in zip(histories, tokens.tolist()):
            h.append(t)
        ours = min(ours, time.process_time() - start)

    procs = hf_processors(params[0])
    ids = prompt
    theirs = float("inf")
    for step in range(STEPS):
        start = time.process_time()
        scores = procs(ids, logits[step].clone())
        tokens = torch.multinomial(scores.softmax(-1), 1)
        ids = torch.cat([ids, tokens], dim=1)
        theirs = min(theirs, time.process_time() - start)
    return ours, theirs


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    print(f"{'setting':34} {'batch':>5} {'gpt2lab cpu ms':>14} {'transformers cpu ms':>20} {'ratio':>6}")
    for name, kwargs in SETTINGS.items():
        for batch in (1, 8):
            ours, theirs = bench(batch, kwargs)
            print(f"{name:34} {batch:5d} {ours * 1e3:14.2f} {theirs * 1e3:20.2f} {theirs / ours:6.2f}")


if __name__ == "__main__":
    main()
