"""Ray Data generation against one process: rows/s and Ray's per-row overhead (docs/scaling.md).

Same random GPT-2 (saved by transformers), same prompts, same seeded sampling. Times one-process generation
(``generate_rows``, 2 threads and 1 thread), then Ray Data generation on a local cluster with 1 and 2 actors
of 1 thread each. Rows come back in order, a batch at a time: the time from the first batch's rows to the
last row gives Ray's marginal time per row (start-up excluded), the rest its start-up (actors started,
model loaded, dataset planned). Per-row overhead: actor-seconds per row on Ray minus a 1-thread process's seconds per
row. On a 2-core machine no speed-up is expected: these are the costs, not a bar.

    PYTHONPATH=src python benchmarks/scale.py [--rows 128 --tokens 16 --layers 2 --embd 128]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _checkpoint(folder: Path, layers: int, embd: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=4, n_embd=embd, n_positions=256)).save_pretrained(folder)
    gpt2 = Path(__file__).resolve().parents[1] / "src" / "gpt2lab" / "assets" / "gpt2-tokenizer"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(gpt2 / name, folder / name)
    return folder


def _one_process(model: Path, prompts: list[str], params, threads: int) -> float:
    import gpt2lab
    from gpt2lab.generation.batch import generate_rows

    torch.set_num_threads(threads)
    gen = gpt2lab.load(model, device="cpu")
    generate_rows(gen, prompts[:2], [0, 1], params)  # warm-up
    start = time.perf_counter()
    for first in range(0, len(prompts), 16):  # as `gpt2lab generate --out` does
        chunk = prompts[first:first + 16]
        generate_rows(gen, chunk, range(first, first + len(chunk)), params)
    return time.perf_counter() - start


def _ray(model: Path, prompts: list[str], params, actors: int, batch_size: int) -> tuple[float, float]:
    """Seconds to the first row (start-up and the first batch) and for the whole Ray Data generation job."""
    from gpt2lab.ray.data import generation_rows

    start, first = time.perf_counter(), None
    for _ in generation_rows(str(model), prompts, params, actors=actors, batch_size=batch_size):
        first = first or time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per row")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per Ray Data batch")
    args = parser.parse_args()

    import ray

    import gpt2lab
    from gpt2lab.ray import connect

    folder = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        model = _checkpoint(folder, args.layers, args.embd)
        params = gpt2lab.load(model, device="cpu").sampling_params(max_new_tokens=args.tokens, seed=0,
                                                                     ignore_eos=True)
        prompts = [f"Row {i}: the weather today is" for i in range(args.rows)]
        one2 = _one_process(model, prompts, params, threads=2)
        one1 = _one_process(model, prompts, params, threads=1)
        connect(num_cpus=2)
        t0 = time.perf_counter()
        ray.get(ray.remote(lambda: None).remote())
        print(f"model: {args.layers} layers x {args.embd}; {args.rows} rows of {args.tokens} new tokens")
        print(f"ray cluster ready in {time.perf_counter() - t0:.1f} s after init")
        print(f"{'one process, 2 threads':28} {args.rows / one2:8.1f} rows/s")
        print(f"{'one process, 1 thread':28} {args.rows / one1:8.1f} rows/s")
        for actors in (1, 2):
            t_first, t_all = _ray(model, prompts, params, actors, args.batch_size)
            per_row = max(t_all - t_first, 1e-9) / (args.rows - args.batch_size)
            start_up = t_first - args.batch_size * per_row
            overhead = per_row * actors - one1 / args.rows  # actor-seconds per row beyond a 1-thread process's
            print(f"{f'ray data, {actors} actor(s) x 1 thread':28} {1 / per_row:8.1f} rows/s after start-up "
                  f"({args.rows / t_all:.1f} rows/s with it); start-up {start_up:.1f} s; "
                  f"overhead {1000 * overhead:+.1f} ms per row")
        ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
