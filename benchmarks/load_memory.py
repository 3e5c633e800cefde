"""Peak memory of loading a GPT-2 XL-shaped checkpoint (1.5B parameters) with and without int8 quantization.

    PYTHONPATH=src python benchmarks/load_memory.py [--quantization int8] [--model-dir DIR]

Writes a random fp32 checkpoint in Hugging Face layout (6.2 GB: ``model.safetensors`` streamed tensor by
tensor, so writing it needs little memory) under ``~/.cache/gpt2lab/bench/gpt2-xl-random`` unless it is
there, then loads it in a fresh process with ``gpt2lab.load(dir, quantization=...)`` and prints that
process's peak resident memory (``ru_maxrss``). Issue 18's bar: int8 under 2.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

XL = dict(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25)
DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab" / "bench" / "gpt2-xl-random"


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF GPT2LMHeadModel tensor names and shapes (Conv1D weights [in, out]); tied head not stored."""
    C, V, P, inner = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], 4 * cfg["n_embd"]
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for i in range(cfg["n_layer"]):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "attn.c_attn.weight": (C, 3 * C),
                       h + "attn.c_attn.bias": (3 * C,), h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "ln_2.weight": (C,), h + "ln_2.bias": (C,), h + "mlp.c_fc.weight": (C, inner),
                       h + "mlp.c_fc.bias": (inner,), h + "mlp.c_proj.weight": (inner, C), h + "mlp.c_proj.bias": (C,)})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def write_checkpoint(directory: Path) -> None:
    """A random fp32 checkpoint, the safetensors file written one tensor at a time (its documented layout:
    8-byte little-endian header size, JSON header, then the raw data)."""
    import torch

    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    directory.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(XL)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = directory / "model.safetensors.tmp"
    gen = torch.Generator().manual_seed(0)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            t = torch.ones(shape) if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
                or name.endswith("ln_f.weight") else torch.randn(shape, generator=gen) * 0.02
            f.write(t.numpy().tobytes())
    tmp.rename(directory / "model.safetensors")
    config = dict(XL, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=XL["n_positions"])
    (directory / "config.json").write_text(json.dumps(config))
    for f in ("vocab.json", "merges.txt"):
        (directory / f).write_bytes((gpt2_tokenizer_dir() / f).read_bytes())


PROBE = """
import resource, sys, gpt2lab
q = sys.argv[2] if sys.argv[2] != "none" else None
gen = gpt2lab.load(sys.argv[1], quantization=q, device="cpu")
print(gen.model.num_parameters(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantization", default="int8", help="int8, bf16, int4 or none")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    if not (args.model_dir / "model.safetensors").is_file():
        print(f"writing a random GPT-2 XL-shaped checkpoint to {args.model_dir} ...", flush=True)
        write_checkpoint(args.model_dir)
    out = subprocess.run([sys.executable, "-c", PROBE, str(args.model_dir), args.quantization], capture_output=True,
                         text=True, check=True)
    params, peak = map(int, out.stdout.split())
    print(f"gpt2lab.load(quantization={args.quantization}) of {params / 1e9:.2f}B parameters: "
          f"peak RSS {peak / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
