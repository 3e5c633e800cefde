"""Loading a checkpoint straight into a quantized :class:`GPT2`, one tensor at a time.

The model starts as a skeleton of meta tensors with quantized modules (``model.quantize``); each
tensor is read from the file, converted to fp32, quantized by its module's ``load_state_dict`` and
dropped before the next is read, so the peak memory is the quantized model plus one fp32 tensor
(GPT-2 XL, 1.5B parameters: about 1.9 GB in int8 instead of 6.2 GB in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model import GPT2, GPT2Config
from ..model.quantize import quantized_skeleton


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a weights file, reading one tensor at a time where the format allows
    (safetensors; a torch pickle is memory-mapped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
            return
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser error means the same to the user
        raise CheckpointError(f"{path}: cannot read weights ({path.stat().st_size} bytes; truncated or "
                              f"corrupt?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    yield from state.items()


def load_quantized(config: GPT2Config, files: list[Path], quantization: str, *, device: str | torch.device = "cpu",
                   source: str | Path = "weights", config_source: str | Path = "config.json") -> GPT2:
    """A ``quantization``-quantized :class:`GPT2` of ``config`` with the HF-layout weights of ``files``
    (one file, or the shards of a sharded checkpoint; ``source`` names them in errors).

    Raises :class:`CheckpointError` when the file does not match the config (missing, unexpected or
    misshapen tensors) or cannot be read.
    """
    from .io import hf_to_gpt2lab

    model = quantized_skeleton(config, quantization)
    expected = set(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in (item for path in files for item in iter_tensors(path)):
        for key, value in hf_to_gpt2lab({name: tensor}).items():
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the same tensor as wte
            if key not in expected:
                unexpected.append(key)
                continue
            if value.is_floating_point():
                value = value.to(torch.float32)
            try:
                model.load_state_dict({key: value}, strict=False, assign=True)
            except RuntimeError as exc:  # a size mismatch
                raise CheckpointError(f"{source}: tensor {key} does not match {config_source}: {exc}") from exc
            seen.add(key)
        del tensor
    missing = sorted(expected - seen)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: does not match {config_source}: {'; '.join(detail)}")
    return model.to(device).eval()
