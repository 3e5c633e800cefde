"""gpt2lab against transformers on one device, in one table: decode, time to first token, training, serving.

Rows (issue 15's bars in brackets, for a GPU run):
- decode tokens/s, greedy, 128 new tokens after a 16-token prompt, GPT-2 124M and a GPT-2 XL shape
  (random weights), batch 1, 8 and 64: ``Generator.generate`` (continuous batching, CUDA graphs)
  against ``GPT2LMHeadModel.generate`` on the same device and dtype [batch 1 >= 3x, batch 64 >= 1.5x];
- time to first token of a 512-token prompt (124M);
- training tokens/s and peak memory, 124M, batch 16 x 1024, bf16 autocast, fused AdamW: gpt2lab's
  trainer step against a plain transformers loop doing the same [>= 1.0x];
- the server's throughput: 64 concurrent streaming clients against ``gpt2lab serve --device``.

    python benchmarks/gpu.py                 # on a GPU machine (benchmarks/gpu.sh runs it)
    python benchmarks/gpu.py --smoke         # tiny shapes on the CPU: checks the script itself

``--smoke`` swaps every size for a tiny one so the whole script runs on a CPU in about a minute; its
figures mean nothing. Prints the table and writes it as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768), "XL": dict(n_layer=48, n_head=25, n_embd=1600)}
SMOKE_SHAPES = {"124M": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
                "XL": dict(n_layer=3, n_head=3, n_embd=96, n_positions=128)}


@dataclass
class Sizes:
    decode_batches: tuple[int, ...] = (1, 8, 64)
    new_tokens: int = 128
    prompt_tokens: int = 16
    ttft_prompt: int = 512
    train_batch: int = 16
    train_block: int = 1024
    train_steps: int = 6
    clients: int = 64
    client_tokens: int = 64
    shapes: dict = field(default_factory=lambda: SHAPES)


SMOKE = Sizes(decode_batches=(1, 2), new_tokens=6, prompt_tokens=4, ttft_prompt=32, train_batch=2, train_block=32,
              train_steps=2, clients=4, client_tokens=4, shapes=SMOKE_SHAPES)


@dataclass
class Row:
    metric: str
    case: str
    ours: float
    theirs: float | None
    unit: str
    bar: float | None = None  # ours / theirs must reach this (None: no bar; for memory lower is better)
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if self.theirs in (None, 0) or self.ours == 0 or self.theirs != self.theirs or self.ours != self.ours:
            return None  # nothing to compare (NaN: not measured on this device)
        return self.theirs / self.ours if self.lower_is_better else self.ours / self.theirs

    def verdict(self) -> str:
        if self.bar is None or self.ratio is None:
            return ""
        return "PASS" if self.ratio >= self.bar else "FAIL"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:  # noqa: ANN001
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def models(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random ``GPT2LMHeadModel`` of ``shape`` and a gpt2lab :class:`Generator` with the same weights."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from gpt2lab.checkpoints.io import hf_to_gpt2lab
    from gpt2lab.generation import Generator
    from gpt2lab.model import GPT2, GPT2Config, optimize_for_inference
    from gpt2lab.tokenizer import Tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        hf = GPT2LMHeadModel(HFConfig(**shape)).to(dtype).eval()
    state = {k: v.contiguous() for k, v in hf_to_gpt2lab(hf.state_dict()).items() if k != "lm_head.weight"}
    with torch.device("meta"):
        net = GPT2(GPT2Config(**shape))
    net.load_state_dict(state, assign=True, strict=True)
    net.eval()
    optimize_for_inference(net, batch_size=64)
    return hf, Generator(net, Tokenizer.gpt2(), name="random")


def decode_rows(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[Row]:
    rows = []
    for name, shape in sizes.shapes.items():
        hf, gen = models(shape, device, dtype)
        for batch in sizes.decode_batches:
            t_ours, t_theirs = _decode_case(sizes, hf, gen, batch, device)
            tokens = batch * sizes.new_tokens
            bar = 3.0 if batch == 1 else 1.5 if batch == 64 else None
            rows.append(Row("decode", f"{name} batch {batch}", tokens / t_ours, tokens / t_theirs, "tok/s", bar))
            print(f"  decode {name} batch {batch}: {tokens / t_ours:,.0f} vs {tokens / t_theirs:,.0f} tok/s",
                  file=sys.stderr, flush=True)
        if name == "124M":
            rows.append(ttft_row(sizes, hf, gen, device))
        del hf, gen
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _decode_case(sizes: Sizes, hf, gen, batch: int, device: torch.device) -> tuple[float, float]:  # noqa: ANN001
    """Best of two timed runs (after a warm-up) of greedy decoding ``batch`` prompts: (ours, theirs) seconds."""
    from gpt2lab.sampling import SamplingParams

    ids = torch.randint(0, 50000, (batch, sizes.prompt_tokens), generator=torch.Generator().manual_seed(batch))
    prompts = [gen.tokenizer.decode(r) for r in ids.tolist()]
    params = SamplingParams(max_new_tokens=sizes.new_tokens, temperature=0, ignore_eos=True)
    x = ids.to(device)

    def ours() -> None:
        _engine_run(gen, prompts, params, batch)

    def theirs() -> None:
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=sizes.new_tokens,
                    min_new_tokens=sizes.new_tokens, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        ours(), theirs()  # warm-up: caches, CUDA graphs, cuBLAS plans
        return min(timed(ours, device) for _ in range(2)), min(timed(theirs, device) for _ in range(2))


def _engine_run(gen, prompts, params, batch: int) -> None:  # noqa: ANN001
    """All prompts decoding together in one engine (what ``Generator.generate`` does, without its cap)."""
    engine = gen.engine(max_batch=batch)
    for p in prompts:
        engine.add_request(gen.encode_prompt(p), params)
    while engine.has_unfinished():
        engine.step()


def ttft_row(sizes: Sizes, hf, gen, device: torch.device) -> Row:  # noqa: ANN001
    from gpt2lab.sampling import SamplingParams

    ids = torch.randint(0, 50000, (sizes.ttft_prompt,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)

    def ours() -> None:
        engine = gen.engine(max_batch=1)
        engine.add_request(ids, params)
        while not engine.step():
            pass

    x = torch.tensor([ids], device=device)

    def theirs() -> None:
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        ours(), theirs()
        t_ours = statistics.median(timed(ours, device) for _ in range(5))
        t_theirs = statistics.median(timed(theirs, device) for _ in range(5))
    return Row("TTFT", f"124M, {sizes.ttft_prompt}-token prompt", t_ours * 1e3, t_theirs * 1e3, "ms",
               lower_is_better=True)


def train_rows(sizes: Sizes, device: torch.device, dtype: str, tmp: Path) -> list[Row]:
    """Training tokens/s and peak memory: gpt2lab's trainer step against a plain transformers loop."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from gpt2lab.training import TrainConfig, Trainer

    shape = sizes.shapes["124M"]
    words = ("the of and to in is was for that on with as by at from his her it an be this are "
             "which or had not but were they have one all their there been has more when who will").split()
    rng = torch.Generator().manual_seed(0)
    n_words = sizes.train_batch * sizes.train_block * (sizes.train_steps + 3)
    picks = torch.randint(0, len(words), (n_words,), generator=rng).tolist()
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    spec = ",".join(f"{k}={v}" for k, v in shape.items())
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp / "train"), config=spec, batch_size=sizes.train_batch,
                      block_size=sizes.train_block, val_share=0.0, progress=False, plot=False, max_steps=1000,
                      device=str(device), dtype=dtype, deterministic=False)
    trainer = Trainer(cfg)
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    tokens = sizes.train_batch * sizes.train_block

    def ours() -> None:
        trainer.optimizer_step(trainer.model, params)
        trainer.step += 1

    amp = None if dtype == "float32" else getattr(torch, dtype)
    with torch.device(device):
        hf = GPT2LMHeadModel(HFConfig(**shape)).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda" or None)
    step = [0]

    def theirs() -> None:
        batch = trainer.sampler.batch(step[0] * sizes.train_batch, sizes.train_batch)[:, :-1].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = hf(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    results = {}
    for name, fn in (("ours", ours), ("theirs", theirs)):
        fn()  # optimizer state, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed(fn, device) for _ in range(sizes.train_steps)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[name] = (tokens / statistics.median(times), peak)
        if name == "ours":  # free the trainer's model before measuring the other's memory
            trainer.model.to("cpu")
            trainer.optimizer.state.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    case = f"124M, batch {sizes.train_batch} x {sizes.train_block}, {dtype}"
    return [Row("train", case, results["ours"][0], results["theirs"][0], "tok/s", 1.0),
            Row("train peak memory", case, results["ours"][1], results["theirs"][1], "GiB", lower_is_better=True)]


def serve_row(sizes: Sizes, device: torch.device, tmp: Path) -> Row:
    """Aggregate tokens/s of ``--clients`` concurrent streaming completions through ``gpt2lab serve``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import httpx
    from serve import free_port, run

    from gpt2lab.checkpoints import save_model
    from gpt2lab.model import GPT2, GPT2Config
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    model = GPT2(GPT2Config(**sizes.shapes["124M"]))
    model.init_weights(seed=0)
    folder = save_model(model, tmp / "serve-model", tokenizer_dir=gpt2_tokenizer_dir())
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", str(folder), "--port", str(port), "--device",
           str(device), "--max-batch", str(sizes.clients), "--max-queue", str(4 * sizes.clients),
           "--log-level", "warning"]
    server = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        prompts = [f"Request {i}: tell me a story about the number {i * 7} and" for i in range(sizes.clients)]
        asyncio.run(run(url, prompts, sizes.client_tokens, concurrent=True))  # warm-up: every bucket's graph
        wall, _, generated = asyncio.run(run(url, prompts, sizes.client_tokens, concurrent=True))
    finally:
        server.terminate()
        server.wait(30)
    return Row("serve", f"124M, {sizes.clients} concurrent clients x {sizes.client_tokens} tokens",
               generated / wall, None, "tok/s")


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(f"| {'metric':18} | {'case':44} | {'gpt2lab':>10} | {'transformers':>12} | {'unit':6} | "
          f"{'ratio':>6} | {'bar':>6} |     |")
    print(f"|{'-' * 20}|{'-' * 46}|{'-' * 12}|{'-' * 14}|{'-' * 8}|{'-' * 8}|{'-' * 8}|-----|")
    for r in rows:
        theirs = "-" if r.theirs is None else f"{r.theirs:,.1f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        bar = "-" if r.bar is None else f"{r.bar:.1f}x"
        print(f"| {r.metric:18} | {r.case:44} | {r.ours:>10,.1f} | {theirs:>12} | {r.unit:6} | {ratio:>6} | "
              f"{bar:>6} | {r.verdict():4}|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (any device): checks the script")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it), float32, bfloat16")
    parser.add_argument("--only", default="decode,train,serve", help="comma-separated: decode, train, serve")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    from gpt2lab.placement import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sizes = SMOKE if args.smoke else Sizes()
    if device.type != "cuda" and not args.smoke:
        print("gpt2lab: no GPU here; this benchmark's sizes are for a GPU (use --smoke to check the script)",
              file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    rows: list[Row] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpt2lab-gpu-bench-") as tmp:
        if "decode" in only:
            rows += decode_rows(sizes, device, dtype)
        if "train" in only:
            rows += train_rows(sizes, device, str(dtype).removeprefix("torch."), Path(tmp))
        if "serve" in only:
            rows += serve_row(sizes, device, Path(tmp)),
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import transformers

    header = (f"gpt2lab vs transformers on {name} ({device}), {str(dtype).removeprefix('torch.')}, torch "
              f"{torch.__version__}, transformers {transformers.__version__}"
              f"{' -- SMOKE sizes: the figures mean nothing' if args.smoke else ''} ({time.monotonic() - start:.0f} s)")
    print_table(rows, header)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": [r.__dict__ | {"ratio": r.ratio,
                                                                                 "verdict": r.verdict()}
                                                                    for r in rows]}, indent=2) + "\n")
    failed = [r for r in rows if r.verdict() == "FAIL"]
    return 1 if failed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
