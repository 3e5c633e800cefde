"""Training throughput of gpt2lab against a plain ``transformers`` loop, and peak memory of GPT-2 124M.

Throughput: the same random GPT-2 (saved once, loaded by both), the same blocks of real tokens, the
same AdamW settings, fp32, dropout on, gradient clipping, on ``--threads`` CPU threads. gpt2lab runs
its own training step (``Trainer.optimizer_step``: fused AdamW, targets without a logits copy); the
reference is the loop a user writes with ``GPT2LMHeadModel(labels=...)`` and ``torch.optim.AdamW``
(default implementation, and again with ``fused=True``). Steps alternate between the loops so load
on a shared machine hits them alike; the median step counts.

Memory: each case runs in its own process (peak RSS = ``ru_maxrss``): GPT-2 124M, batch 4 x 512, one
full optimizer step (the first one allocates the AdamW state).

    python benchmarks/train.py                  # both parts
    python benchmarks/train.py --no-memory      # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the of and to a in that is was he for it with as his on be at by I had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said what "
         "up its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people Mr how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()


def _corpus(path: Path, n_words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _trainer(corpus: Path, out: Path, batch: int, block: int, *, model: str | None = None, config: str | None = None,
             checkpointing: bool = False):
    from gpt2lab.training import TrainConfig, Trainer

    cfg = TrainConfig(data=[str(corpus)], out=str(out), model=model, config=config, batch_size=batch,
                      block_size=block, lr=1e-4, val_share=0.0, progress=False, plot=False, max_steps=1000,
                      grad_checkpointing=checkpointing)
    trainer = Trainer(cfg)
    trainer.model.train()
    trainer.model.gradient_checkpointing = checkpointing
    return trainer


def throughput(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_hf_checkpoint
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="gpt2lab-bench-train-"))
    shape = dict(kv.split("=") for kv in args.shape.split(","))
    ckpt = make_hf_checkpoint(tmp / "model", seed=0, **{k: int(v) for k, v in shape.items()})
    corpus = _corpus(tmp / "corpus.txt", n_words=args.batch * args.block * (args.steps + 4))
    ours = _trainer(corpus, tmp / "out", args.batch, args.block, model=str(ckpt))
    ours_params = [p for p in ours.model.parameters() if p.requires_grad]

    def hf_loop(fused: bool):
        model = GPT2LMHeadModel.from_pretrained(ckpt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused or None)
        step = [0]

        def run() -> None:
            batch = ours.sampler.batch(step[0] * args.batch, args.batch)[:, :-1]  # the same blocks, T tokens
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step[0] += 1
        return run

    def ours_run() -> None:
        ours.optimizer_step(ours.model, ours_params)
        ours.step += 1

    cases = {"gpt2lab": ours_run, "transformers": hf_loop(False), "transformers (fused AdamW)": hf_loop(True)}
    tokens = args.batch * args.block
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: first-step allocations and optimizer state
        fn()
    # steps alternate between the loops, so a shared machine's load drifts over all of them alike
    for _ in range(args.steps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(tokens / (time.perf_counter() - t0))
    result = {name: statistics.median(r) for name, r in rates.items()}
    n_params = sum(p.numel() for p in ours.model.parameters())
    print(f"\ntraining throughput: GPT-2 {args.shape} ({n_params / 1e6:.1f}M params), batch {args.batch} x "
          f"{args.block}, fp32, AdamW, {args.threads} threads, median of {args.steps} interleaved steps each")
    for name, rate in result.items():
        print(f"  {name:28s} {rate:9,.0f} tokens/s   (steps: {', '.join(f'{r:,.0f}' for r in rates[name])})")
    ratio = result["gpt2lab"] / result["transformers"]
    print(f"  ratio gpt2lab / transformers            {ratio:.2f}x")
    print(f"  ratio gpt2lab / transformers (fused)    {result['gpt2lab'] / result['transformers (fused AdamW)']:.2f}x")
    return {"ratio": ratio, **result}


def memory_worker(case: str, threads: int) -> None:
    """One training step of GPT-2 124M at batch 4 x 512 in this process; print peak RSS."""
    import torch

    torch.set_num_threads(threads)
    batch, block = 4, 512
    tmp = Path(tempfile.mkdtemp(prefix="gpt2lab-bench-mem-"))
    corpus = _corpus(tmp / "corpus.txt", n_words=batch * (block + 1) * 2)
    t0 = time.perf_counter()
    if case.startswith("gpt2lab"):
        trainer = _trainer(corpus, tmp / "out", batch, block, config="gpt2", checkpointing=case.endswith("ckpt"))
        trainer.optimizer_step(trainer.model, [p for p in trainer.model.parameters() if p.requires_grad])
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        from gpt2lab.tokenizer import Tokenizer

        model = GPT2LMHeadModel(GPT2Config()).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        ids = Tokenizer.gpt2().encode(corpus.read_text())[:batch * block]
        x = torch.tensor(ids).view(batch, block)
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "peak_mb": peak_mb, "seconds": time.perf_counter() - t0}))


def memory(args: argparse.Namespace) -> None:
    print("\npeak memory: GPT-2 124M, batch 4 x 512, fp32, one AdamW step (own process each, peak RSS)")
    for case in ("gpt2lab", "gpt2lab ckpt", "transformers"):
        run = subprocess.run([sys.executable, __file__, "--memory-worker", case, "--threads", str(args.threads)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        if run.returncode != 0:
            print(f"  {case}: failed\n{run.stderr[-2000:]}")
            continue
        rec = json.loads(run.stdout.strip().splitlines()[-1])
        label = {"gpt2lab": "gpt2lab", "gpt2lab ckpt": "gpt2lab --grad-checkpointing",
                 "transformers": "transformers"}[case]
        print(f"  {label:28s} {rec['peak_mb'] / 1024:6.2f} GiB   ({rec['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="n_layer=6,n_head=6,n_embd=192,n_positions=256",
                        help="GPT-2 shape for the throughput run (default: the bundled Shakespeare model's)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop (interleaved)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the GPT-2 124M memory measurement")
    parser.add_argument("--memory-only", action="store_true", help="only the GPT-2 124M memory measurement")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.threads)
        return
    if args.memory_only:
        memory(args)
        return
    result = throughput(args)
    if not args.no_memory:
        memory(args)
    if result["ratio"] < 1.0:
        print("\nFAIL: gpt2lab is slower than the transformers loop")
        sys.exit(1)


if __name__ == "__main__":
    main()
