"""Soak test: many clients, good and bad requests mixed, against a real ``gpt2lab serve`` on loopback.

Starts ``gpt2lab serve`` on 127.0.0.1 (a random-weight model, nothing downloaded; or ``--model``),
runs ``--clients`` concurrent clients for ``--seconds`` seconds, each sending completions, streams and
chats with a share (``--bad``) of bad requests mixed in (out-of-vocabulary ids, lone surrogates, too
many stop strings, an over-sized body, broken JSON, out-of-range values, oversized prompts), and
prints what came back: requests served, 429s, other 4xx, 5xx (must be 0), p50/p99 latency of the
served ones, /health's slowest answer, and the server's RSS at the start and the end. Exits 1 if
any 5xx or transport error was seen. Bounded: loopback only, a fixed duration, a fixed client count.

    PYTHONPATH=src python benchmarks/soak.py [--clients 32] [--seconds 60] [--bad 0.2] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, start_server  # noqa: E402  (the serving benchmark's helpers)

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground", "ROMEO:", "def main():"]


def random_model(directory: Path) -> Path:
    """A small random-weight GPT-2 (4 layers, 256 wide, 512 positions) with GPT-2's tokenizer."""
    from gpt2lab.checkpoints import save_model
    from gpt2lab.model import GPT2, GPT2Config
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    model = GPT2(GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=512))
    model.init_weights(seed=0)
    save_model(model, directory, tokenizer_dir=gpt2_tokenizer_dir())
    return directory


def good_request(rng: random.Random) -> tuple[str, dict]:
    kind = rng.random()
    sampling = {"max_tokens": rng.randint(4, 32), "temperature": rng.choice([0.0, 0.7, 1.0]),
                "seed": rng.randrange(1000), "top_k": rng.choice([0, 40])}
    if kind < 0.4:
        return "/v1/completions", {"prompt": rng.choice(PROMPTS), **sampling}
    if kind < 0.7:
        return "/v1/completions", {"prompt": rng.choice(PROMPTS), "stream": True, **sampling}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                                    "stream": rng.random() < 0.5, **sampling}


BAD_BODIES: list[tuple[str, object]] = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {"50257": 5}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"99999": 1}}),
    ("/v1/completions", {"prompt": [15496, 50300]}),
    ("/v1/completions", {"prompt": "Hi \ud800"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}),
    ("/tokenize", {"prompt": "\ud800"}),
    ("/v1/completions", {"prompt": "Hi", "stop": [f"s{i}" for i in range(50)]}),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**9}),
    ("/v1/completions", {"prompt": "hello " * 200_000}),  # within the body limit, far over the context
    ("/v1/completions", b'{"prompt": "unterminated'),
    ("/v1/completions", b"\xff\xfe\x00"),
    ("/v1/completions", {"prompt": "x" * (5 * 2**20)}),  # over the 4 MB body limit: 413
    ("/v1/completions", {"prompt": "Hi", "n": 10_000}),
    ("/v1/completions", {"prompt": "Hi", "temprature": 0.5}),
]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def client_loop(client: httpx.AsyncClient, seed: int, bad_share: float, deadline: float,
                      bodies: list[tuple[str, bytes]], stats: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        bad = rng.random() < bad_share
        if bad:
            path, content = rng.choice(bodies)
        else:
            path, body = good_request(rng)
            content = json.dumps(body).encode()
        start = time.perf_counter()
        try:
            async with client.stream("POST", path, content=content,
                                     headers={"content-type": "application/json"}) as response:
                async for _ in response.aiter_bytes():
                    pass
            status = response.status_code
        except httpx.HTTPError as exc:
            stats["transport_errors"][type(exc).__name__] += 1
            continue
        elapsed = time.perf_counter() - start
        stats["status"][status] += 1
        if 200 <= status < 300:
            stats["latency"].append(elapsed)
        elif status == 429:
            await asyncio.sleep(float(response.headers.get("retry-after", "1")) * rng.random())
        elif status >= 500:
            stats["server_errors"].append((path, content[:200], status))


async def health_loop(client: httpx.AsyncClient, deadline: float, stats: dict) -> None:
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            response = await client.get("/health")
            stats["health"].append(time.perf_counter() - start)
            stats["health_status"][response.status_code] += 1
        except httpx.HTTPError as exc:
            stats["transport_errors"]["health " + type(exc).__name__] += 1
        await asyncio.sleep(0.2)


async def soak(url: str, pid: int, clients: int, seconds: float, bad_share: float) -> dict:
    bodies = [(path, body if isinstance(body, bytes) else json.dumps(body).encode()) for path, body in BAD_BODIES]
    stats: dict = {"status": Counter(), "latency": [], "health": [], "health_status": Counter(),
                   "transport_errors": Counter(), "server_errors": [], "rss": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        deadline = time.monotonic() + seconds

        async def sample_rss() -> None:
            while time.monotonic() < deadline:
                stats["rss"].append(rss_kb(pid))
                await asyncio.sleep(1)

        await asyncio.gather(health_loop(client, deadline, stats), sample_rss(),
                             *(client_loop(client, i, bad_share, deadline, bodies, stats) for i in range(clients)))
    return stats


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else \
        (values[0] if values else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bad", type=float, default=0.2, help="share of bad requests (0..1)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--model", type=Path, help="a model directory (default: a small random GPT-2)")
    args = parser.parse_args()
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 3600 or not 0 <= args.bad <= 1:
        parser.error("--clients in [1, 1024], --seconds in (0, 3600], --bad in [0, 1]")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model(Path(tmp) / "model")
        port = free_port()
        log = Path(tmp) / "server.log"
        server = start_server(model, port, args.max_batch, log)  # binds 127.0.0.1 only
        try:
            url = f"http://127.0.0.1:{port}"
            rss_start = rss_kb(server.pid)
            stats = asyncio.run(soak(url, server.pid, args.clients, args.seconds, args.bad))
            rss_end = rss_kb(server.pid)
            alive = server.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200
        finally:
            server.terminate()
            server.wait(30)

    status = stats["status"]
    served = sum(n for s, n in status.items() if 200 <= s < 300)
    too_many = status[429]
    client_errors = sum(n for s, n in status.items() if 400 <= s < 500 and s != 429)
    server_errors = sum(n for s, n in status.items() if s >= 500)
    lat = stats["latency"]
    print(f"soak: {args.clients} clients x {args.seconds:g} s, {args.bad:.0%} bad requests, "
          f"max_batch {args.max_batch}, model {args.model or 'random 4-layer GPT-2'}")
    print(f"  requests: {sum(status.values())}  served (2xx): {served}  429: {too_many}  4xx: {client_errors}  "
          f"5xx: {server_errors}  transport errors: {sum(stats['transport_errors'].values())}")
    print(f"  statuses: {dict(sorted(status.items()))}")
    print(f"  latency of served requests: p50 {percentile(lat, 50) * 1000:.0f} ms  "
          f"p99 {percentile(lat, 99) * 1000:.0f} ms")
    print(f"  /health: {len(stats['health'])} polls, slowest {max(stats['health'], default=0) * 1000:.0f} ms, "
          f"statuses {dict(stats['health_status'])}")
    print(f"  server RSS: start {rss_start / 1024:.0f} MiB  end {rss_end / 1024:.0f} MiB  "
          f"max {max(stats['rss'], default=0) / 1024:.0f} MiB;  alive and healthy at the end: {alive}")
    for path, content, code in stats["server_errors"][:5]:
        print(f"  5xx {code} on {path}: {content!r}")
    if stats["transport_errors"]:
        print(f"  transport errors: {dict(stats['transport_errors'])}")
    sys.exit(0 if server_errors == 0 and not stats["transport_errors"] and alive else 1)


if __name__ == "__main__":
    main()
