"""Loading a checkpoint straight into a quantized :class:`GPT2`, one tensor at a time.

The model starts as a skeleton of meta tensors with quantized modules (``model.quantize``); each
tensor is read from the file by the one tensor reader (:func:`gpt2lab.checkpoints.tensors.read_tensors`),
converted to fp32, quantized by its module's ``load_state_dict`` and dropped before the next is
read, so the peak memory is the quantized model plus one fp32 tensor (GPT-2 XL, 1.5B parameters:
about 1.9 GB in int8 instead of 6.2 GB in fp32).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model import GPT2, GPT2Config
from ..model.quantize import quantized_skeleton
from ..placement import torch_threads
from .tensors import check_tensor_names, hf_to_gpt2lab, read_tensors


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Each tensor's fp32 read buffer and temporaries are freed before the next is read, but glibc keeps
    freed blocks of a few MB in its heap between the int8 tensors that stay: measured on a GPT-2
    XL-shaped checkpoint, the peak resident memory was 3.4 GB without trimming and 2.1 GB with it."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | bool | None = None


def load_quantized(config: GPT2Config, files: list[Path], quantization: str, *, device: str | torch.device = "cpu",
                   source: str | Path = "weights", config_source: str | Path = "config.json") -> GPT2:
    """A ``quantization``-quantized :class:`GPT2` of ``config`` with the HF-layout weights of ``files``
    (one file, or the shards of a sharded checkpoint; ``source`` names them in errors).

    Raises :class:`CheckpointError` when the file does not match the config (missing, unexpected or
    misshapen tensors) or cannot be read.
    """
    model = quantized_skeleton(config, quantization)
    expected = set(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    unexpected: list[str] = []
    # one tensor at a time (safetensors read tensor by tensor, a torch pickle memory-mapped), on one thread:
    # quantizing is a few short elementwise passes per tensor, each a parallel region that waits for its
    # slowest thread, so a core kept busy by another process stalls every pass (GPT-2 124M in int8 on the
    # shared 2-core machine: 5.8 s on 2 threads, 1.9 s on 1)
    with torch_threads(1):
        for name, tensor in (item for path in files for item in read_tensors(path, mmap=True)):
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
            tensor = value = None  # freed before the heap is trimmed
            _trim_heap()
    missing = sorted(expected - seen)
    check_tensor_names(source, config_source, missing, unexpected)
    return model.to(device).eval()
