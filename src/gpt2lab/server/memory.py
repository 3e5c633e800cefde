"""The memory budget of a server of several models (``gpt2lab serve --max-models-memory``).

Each model's need is estimated before anything loads, from its ``config.json``: its weights as they will
sit in memory (the dtype, or the quantized layout: the same meta-device skeleton the loader fills, so
no second table of sizes), its KV cache with every row of the batch at the full context, its prefix-cache
pool and its LoRA adapters' files (kept in float32). A server whose models would not fit is refused at
start-up with a message naming each model and what it needs, instead of failing later with an
out-of-memory error in the middle of serving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*")


def parse_size(text: str, name: str = "size") -> int:
    """Bytes of a size written with its unit: ``"8GB"``, ``"512MB"``, ``"1.5GiB"``, ``"300000000B"``
    (decimal ``KB``/``MB``/``GB``/``TB``, binary ``KiB``...``TiB``; case-insensitive). ``ValueError`` naming
    ``name`` for anything else (a bare number is refused: megabytes or gigabytes would be a guess)."""
    m = _SIZE.fullmatch(str(text))
    unit = _UNITS.get(m[2].lower()) if m else None
    if unit is None:
        raise ValueError(f"{name} must be a size with its unit, such as 8GB, 512MB or 2GiB; got {text!r}")
    size = int(float(m[1]) * unit)
    if size <= 0:
        raise ValueError(f"{name} must be more than 0 bytes, got {text!r}")
    return size


def format_size(size: float) -> str:
    """``size`` bytes for people: ``"1.2 GB"``, ``"350 MB"``, ``"12 kB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class ModelMemory:
    """What one served model needs, in bytes."""

    name: str
    weights: int
    kv_cache: int
    prefix_cache: int = 0
    adapters: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.prefix_cache + self.adapters

    def describe(self) -> str:
        parts = [f"{format_size(self.weights)} weights", f"{format_size(self.kv_cache)} KV cache"]
        if self.prefix_cache:
            parts.append(f"{format_size(self.prefix_cache)} prefix cache")
        if self.adapters:
            parts.append(f"{format_size(self.adapters)} adapters")
        return f"{self.name} {format_size(self.total)} ({', '.join(parts)})"


def estimate(name: str, directory: Path | None, *, model: torch.nn.Module | None = None,
             dtype: torch.dtype = torch.float32, quantization: str | None = None, max_batch: int,
             prefix_cache_bytes: int = 0, adapters: tuple[Path, ...] = ()) -> ModelMemory:
    """The memory model ``name`` needs when served with ``max_batch`` KV-cache rows, a prefix cache of
    ``prefix_cache_bytes`` and the LoRA adapter folders ``adapters``: a checkpoint folder ``directory`` with
    weights in ``dtype`` (or ``quantization``), or a loaded ``model`` as it is. Raises as reading the
    checkpoint's ``config.json`` does (:class:`~gpt2lab.errors.CheckpointError` naming the file)."""
    from ..checkpoints.io import read_config
    from ..model.gpt2 import GPT2, KVCache, meta_skeleton
    from ..model.quantize import quantized_skeleton

    if model is None:
        config = read_config(directory)
        if quantization is not None:
            model = quantized_skeleton(config, quantization)
        else:
            with meta_skeleton():
                model = GPT2(config).to(dtype)
    config = model.config
    # parameters and buffers, but not a loaded model's KV cache: it is counted below at its full size
    tensors = [t for m in model.modules() if not isinstance(m, KVCache)
               for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())  # tied: once
    kv_dtype = model.wpe.weight.dtype  # the cache's dtype (float32 under quantization: the kernels' cache)
    kv = 2 * config.n_layer * max_batch * config.n_positions * config.n_embd * kv_dtype.itemsize
    adapter_bytes = 0
    for folder in adapters:  # their matrices, held in float32 whatever the file stores
        for file in Path(folder).glob("adapter_model.*"):
            adapter_bytes += file.stat().st_size * (2 if _half_precision(file) else 1)
    return ModelMemory(name, weights, kv, prefix_cache_bytes, adapter_bytes)


def _half_precision(file: Path) -> bool:
    if file.suffix != ".safetensors":
        return False
    from ..checkpoints.tensors import safetensors_header

    entries, _ = safetensors_header(file)
    return bool(entries) and all(e.dtype in (torch.float16, torch.bfloat16) for e in entries)


def check_budget(needs: list[ModelMemory], budget: int) -> None:
    """``ValueError`` naming every model and its need when together they need more than ``budget`` bytes."""
    total = sum(m.total for m in needs)
    if total > budget:
        raise ValueError(f"the models need {format_size(total)}, more than --max-models-memory "
                         f"{format_size(budget)}: {'; '.join(m.describe() for m in needs)}")
