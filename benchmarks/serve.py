"""Serving throughput: continuous batching vs the same requests one at a time, through the real server.

Starts ``gpt2lab serve`` on a randomly initialised GPT-2 124M (no download), sends ``--clients``
concurrent streaming completions of ``--tokens`` new tokens each, then the same requests one after
another, and prints aggregate tokens/s, time to first token (p50/p95) and the speed-up. The bar:
continuous batching reaches at least 3x the one-at-a-time throughput.

    PYTHONPATH=src python benchmarks/serve.py [--clients 16] [--tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BAR = 3.0


def random_gpt2_124m(directory: Path) -> Path:
    """GPT-2 124M's shape with random weights, saved with GPT-2's tokenizer."""
    from gpt2lab.checkpoints import save_model
    from gpt2lab.model import GPT2, GPT2Config
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    model = GPT2(GPT2Config())
    model.init_weights(seed=0)
    save_model(model, directory, tokenizer_dir=gpt2_tokenizer_dir())
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_batch: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--log-level", "warning"]
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise SystemExit("server not ready after 300 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int, seed: int) -> tuple[float, int]:
    """Stream one completion; return (time to first token, tokens generated)."""
    body = {"prompt": prompt, "max_tokens": tokens, "seed": seed, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, generated = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            elif ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), generated


async def run(url: str, prompts: list[str], tokens: int, concurrent: bool) -> tuple[float, list[float], int]:
    async with httpx.AsyncClient(timeout=None) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, p, tokens, i) for i, p in enumerate(prompts)))
        else:
            results = [await one_request(client, url, p, tokens, i) for i, p in enumerate(prompts)]
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", help="checkpoint directory (default: a random GPT-2 124M)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_gpt2_124m(Path(tmp) / "gpt2-124m-random")
        port = free_port()
        server = start_server(model, port, max_batch=args.clients, log=Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{port}"
        try:
            prompts = [f"Request {i}: tell me a story about the number {i * 7} and" for i in range(args.clients)]
            asyncio.run(run(url, prompts[:2], 4, concurrent=True))  # warm-up (cache allocation, first kernels)
            batched = asyncio.run(run(url, prompts, args.tokens, concurrent=True))
            print(f"  (continuous batching done in {batched[0]:.1f} s; now one at a time)", file=sys.stderr, flush=True)
            sequential = asyncio.run(run(url, prompts, args.tokens, concurrent=False))
        finally:
            server.terminate()
            server.wait(30)

    print(f"gpt2lab serve, random GPT-2 124M, {args.clients} clients x {args.tokens} new tokens, "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}, cpus={os.cpu_count()}")
    rows = []
    for name, (wall, ttfts, generated) in (("continuous batching", batched), ("one at a time", sequential)):
        rows.append(generated / wall)
        print(f"  {name:20s} {generated:5d} tokens in {wall:7.2f} s = {generated / wall:7.1f} tok/s   "
              f"TTFT p50 {percentile(ttfts, 50):6.3f} s  p95 {percentile(ttfts, 95):6.3f} s")
    speedup = rows[0] / rows[1]
    print(f"  speed-up: {speedup:.2f}x (bar: >= {BAR:.0f}x) -> {'PASS' if speedup >= BAR else 'FAIL'}")


if __name__ == "__main__":
    main()
