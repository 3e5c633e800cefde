"""Serving benchmarks through the real server, on a randomly initialised GPT-2 124M (no download).

``--scenario batching`` (default): ``--clients`` concurrent streaming completions of ``--tokens`` new tokens
each, then the same requests one after another: aggregate tokens/s, time to first token (p50/p95) and the
speed-up. The bar: continuous batching reaches at least 3x the one-at-a-time throughput.

``--scenario prefix``: chats of 10 turns whose history reaches ~900 tokens, the whole conversation sent each
turn (as chat clients do), against a server with prefix reuse and one with ``--prefix-cache-mb 0``: the
median time to first token of turn 10 over ``--repeats`` chats. The bar: at least 5x faster with prefix reuse.

``--scenario lora``: ``--clients`` concurrent clients spread over 4 LoRA adapters (rank 8, on every
projection) against the same clients on the base model alone, on one server: aggregate tokens/s. The bar:
at least 0.8x the base model's.

    PYTHONPATH=src python benchmarks/serve.py [--scenario batching|prefix|lora] [--clients 16] [--tokens 64]
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
PREFIX_BAR = 5.0
LORA_BAR = 0.8


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


def random_adapters(model: Path, directory: Path, count: int) -> list[Path]:
    """``count`` LoRA adapters of ``model`` (rank 8 on every projection, random B), in peft's format."""
    import torch

    from gpt2lab.checkpoints import load_model
    from gpt2lab.checkpoints.adapters import fill_adapter_dir
    from gpt2lab.model.lora import apply_lora, lora_modules

    out = []
    for i in range(count):
        net = load_model(model)
        apply_lora(net, rank=8, alpha=16, targets="c_attn,attn.c_proj,c_fc,mlp.c_proj", seed=i)
        with torch.no_grad():
            for m in lora_modules(net).values():
                m.lora_B.normal_(0, 0.02)
        (directory / f"a{i}").mkdir(parents=True)
        fill_adapter_dir(net, directory / f"a{i}", str(model), "c_attn,attn.c_proj,c_fc,mlp.c_proj")
        out.append(directory / f"a{i}")
    return out


def start_server(model: Path, port: int, max_batch: int, log: Path, *more: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--log-level", "warning", *more]
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


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int, seed: int,
                      model: str | None = None) -> tuple[float, int]:
    """Stream one completion (of served model ``model``, default the server's); return (time to first token,
    tokens generated)."""
    body = {"prompt": prompt, "max_tokens": tokens, "seed": seed, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
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


async def run(url: str, prompts: list[str], tokens: int, concurrent: bool,
              models: list[str | None] | None = None) -> tuple[float, list[float], int]:
    models = models or [None] * len(prompts)
    async with httpx.AsyncClient(timeout=None) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, p, tokens, i, m)
                                             for i, (p, m) in enumerate(zip(prompts, models))))
        else:
            results = [await one_request(client, url, p, tokens, i, m) for i, (p, m) in enumerate(zip(prompts, models))]
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def print_rates(results: dict[str, tuple[float, list[float], int]]) -> list[float]:
    """Print each run's tokens/s and time to first token; their tokens/s, in order."""
    rates = []
    for name, (wall, ttfts, generated) in results.items():
        rates.append(generated / wall)
        print(f"  {name:20s} {generated:5d} tokens in {wall:7.2f} s = {generated / wall:7.1f} tok/s   "
              f"TTFT p50 {percentile(ttfts, 50):6.3f} s  p95 {percentile(ttfts, 95):6.3f} s")
    return rates


def chat_turn10_ttft(url: str, tokens: int, chat: int = 0) -> tuple[float, list[str], int]:
    """A 10-turn chat through ``/v1/chat/completions``, each user message ~70 tokens, the whole conversation
    sent each turn; the time to first token of turn 10, the replies and turn 10's prompt tokens (~900: the
    history must fit the 1024-token context whole, or the server drops the oldest turns and the conversation
    no longer starts with what was cached). ``chat`` numbers the conversation: different chats share only
    the system message."""
    messages = [{"role": "system", "content": "You are a patient assistant who answers questions about stories."}]
    replies, ttft, prompt_tokens = [], 0.0, 0
    with httpx.Client(timeout=None) as client:
        for turn in range(10):
            words = " ".join(f"detail{turn}-{i}" for i in range(14))
            messages.append({"role": "user", "content": f"Chat {chat} turn {turn}: here are the details: {words}. "
                                                        f"Go on."})
            body = {"messages": messages, "max_tokens": tokens, "seed": turn, "stream": True,
                    "stream_options": {"include_usage": True}}
            start, first, text = time.perf_counter(), None, []
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            prompt_tokens = event["usage"]["prompt_tokens"]
                        delta = event["choices"][0]["delta"].get("content") if event.get("choices") else None
                        if delta:
                            first = first or time.perf_counter()
                            text.append(delta)
            ttft = (first or time.perf_counter()) - start
            replies.append("".join(text))
            messages.append({"role": "assistant", "content": replies[-1]})
    return ttft, replies, prompt_tokens


def scenario_prefix(model: Path, tmp: Path, tokens: int, repeats: int) -> None:
    results = {}
    for name, more in (("prefix reuse", ()), ("no prefix reuse", ("--prefix-cache-mb", "0"))):
        port = free_port()
        server = start_server(model, port, 4, tmp / f"server-{len(results)}.log", *more)
        try:
            results[name] = [chat_turn10_ttft(f"http://127.0.0.1:{port}", tokens, chat) for chat in range(repeats)]
        finally:
            server.terminate()
            server.wait(30)
    print(f"gpt2lab serve, random GPT-2 124M, {repeats} chats of 10 turns, {tokens} tokens a reply, "
          f"cpus={os.cpu_count()}")
    for name, chats in results.items():
        times = [c[0] for c in chats]
        print(f"  {name:16s} turn-10 time to first token: median {statistics.median(times):7.3f} s "
              f"(each chat: {', '.join(f'{t:.3f}' for t in times)}; turn-10 prompt "
              f"{', '.join(str(c[2]) for c in chats)} tokens)")
    same = [c[1] for c in results["prefix reuse"]] == [c[1] for c in results["no prefix reuse"]]
    ratio = (statistics.median(c[0] for c in results["no prefix reuse"])
             / statistics.median(c[0] for c in results["prefix reuse"]))
    print(f"  replies identical: {same}; speed-up {ratio:.1f}x (bar: >= {PREFIX_BAR:.0f}x) -> "
          f"{'PASS' if ratio >= PREFIX_BAR and same else 'FAIL'}")


def scenario_lora(model: Path, tmp: Path, clients: int, tokens: int) -> None:
    adapters = random_adapters(model, tmp / "adapters", 4)
    port = free_port()
    more = [arg for i, a in enumerate(adapters) for arg in ("--lora", f"a{i}={a}")]
    server = start_server(model, port, clients, tmp / "server.log", *more)
    url = f"http://127.0.0.1:{port}"
    prompts = [f"Request {i}: tell me a story about the number {i * 7} and" for i in range(clients)]
    try:
        asyncio.run(run(url, prompts[:2], 4, concurrent=True, models=[None, "a0"]))  # warm-up
        base = asyncio.run(run(url, prompts, tokens, concurrent=True))
        mixed = asyncio.run(run(url, prompts, tokens, concurrent=True, models=[f"a{i % 4}" for i in range(clients)]))
    finally:
        server.terminate()
        server.wait(30)
    print(f"gpt2lab serve, random GPT-2 124M, {clients} clients x {tokens} new tokens, cpus={os.cpu_count()}")
    rates = print_rates({"base model only": base, "over 4 adapters": mixed})
    ratio = rates[1] / rates[0]
    print(f"  adapters / base: {ratio:.2f}x (bar: >= {LORA_BAR}x) -> {'PASS' if ratio >= LORA_BAR else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("batching", "prefix", "lora"), default="batching")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", help="checkpoint directory (default: a random GPT-2 124M)")
    parser.add_argument("--repeats", type=int, default=3, help="prefix scenario: chats per server (median counts)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_gpt2_124m(Path(tmp) / "gpt2-124m-random")
        if args.scenario == "prefix":
            return scenario_prefix(model, Path(tmp), min(args.tokens, 16), args.repeats)
        if args.scenario == "lora":
            return scenario_lora(model, Path(tmp), args.clients, args.tokens)
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
    rows = print_rates({"continuous batching": batched, "one at a time": sequential})
    speedup = rows[0] / rows[1]
    print(f"  speed-up: {speedup:.2f}x (bar: >= {BAR:.0f}x) -> {'PASS' if speedup >= BAR else 'FAIL'}")


if __name__ == "__main__":
    main()
