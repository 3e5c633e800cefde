"""Weight files: the one tensor reader of gpt2lab (plain and quantized loads, LoRA adapters) and the
mapping between Hugging Face GPT-2 tensor names/layouts and gpt2lab's.

HF GPT-2 stores its projections as ``Conv1D`` (weight ``[in, out]``); our model uses ``nn.Linear``
(``[out, in]``), so those four weights per block are transposed on the way in and out.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..readers import ReadError, parse_json

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# buffers older HF versions stored in checkpoints; derived from the config, never loaded
IGNORED_BUFFERS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


# -- reading tensors -------------------------------------------------------------------------------------
# safetensors dtype names -> torch (the format's own table, as far as torch has the type)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the limit the safetensors library itself enforces


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _unreadable(path: Path, detail: object) -> CheckpointError:
    size = path.stat().st_size if path.is_file() else 0
    return CheckpointError(f"{path}: cannot read weights ({size} bytes; truncated or corrupt?): {detail}")


def safetensors_header(path: str | Path) -> tuple[list[TensorEntry], int]:
    """The tensors a safetensors file declares (in file order) and the offset of its data section, from
    the header alone (the format: an 8-byte little-endian header size, a JSON header of dtype / shape /
    data_offsets per tensor, then the data). Every entry is checked against the file's size, so reading
    it cannot go out of bounds; :class:`CheckpointError` names the file and what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        first = fh.read(8)
        if len(first) < 8:
            raise _unreadable(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", first)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise _unreadable(path, f"header size {length:,} does not fit the file")
        raw = fh.read(length)
    try:
        header = parse_json(raw.decode("utf-8"), path)
    except (ReadError, UnicodeDecodeError) as exc:
        raise _unreadable(path, f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    data = size - 8 - length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
            ok = all(type(n) is int and n >= 0 for n in (*shape, start, end)) and start <= end <= data
        except (KeyError, TypeError, ValueError):
            raise _unreadable(path, f"tensor {name}: not a safetensors entry ({str(info)[:80]})") from None
        if not ok or (end - start) != math.prod(shape) * dtype.itemsize:
            raise _unreadable(path, f"tensor {name}: shape {list(shape)} of {info['dtype']} does not match its "
                                    f"data range {info['data_offsets']}")
        entries.append(TensorEntry(name, dtype, shape, start, end))
    return sorted(entries, key=lambda e: e.start), 8 + length


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor read (not memory-mapped) straight into its own torch buffer, one ``read`` each: the
    caller decides what stays in memory (a quantizing loader keeps only the quantized copy; a mapped
    file's touched pages would stay resident until it is closed)."""
    entries, base = safetensors_header(path)
    with open(path, "rb") as fh:
        for e in entries:
            tensor = torch.empty(e.shape, dtype=e.dtype)
            if e.end > e.start:
                fh.seek(base + e.start)
                view = tensor.view(-1).view(torch.uint8).numpy()
                if fh.readinto(memoryview(view)) != e.end - e.start:
                    raise _unreadable(path, f"tensor {e.name} is cut short")
            yield e.name, tensor


def read_tensors(path: str | Path, *, mmap: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a weights file, one tensor at a time: the one tensor reader of gpt2lab
    (plain and quantized loads, LoRA adapters).

    ``.safetensors``: read tensor by tensor (see :func:`safetensors_header`). A torch pickle (``.bin``):
    ``torch.load(weights_only=True)``, so it cannot run code; ``mmap``: map it instead of reading it
    (zip-format files; the older format is read). Raises :class:`CheckpointError` naming the file: not
    found, truncated or corrupt, "refused: loading this pickle would run code", not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        yield from _safetensors_tensors(path)
        return
    try:
        import zipfile

        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - every parser error means the same to the user
        # torch's weights_only unpickler met a reference to code (a global or a call), not a tensor
        if re.search(r"Unsupported global|unrecognized function|Unsupported class", str(exc)):
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = f" (it references {refused.group(1)})" if refused else ""
            raise CheckpointError(
                f"{path}: refused: loading this pickle would run code{what}; only "
                "plain tensors are loaded (torch.load weights_only=True). If you trust the file, convert it "
                "to safetensors yourself") from None
        raise _unreadable(path, exc) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    yield from state.items()


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header only (nothing else is read)."""
    return {e.name: e.shape for e in safetensors_header(path)[0]}


def hf_to_gpt2lab(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Map HF ``GPT2LMHeadModel``/``GPT2Model`` tensor names and layouts to ours."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in (state.items() if isinstance(state, Mapping) else state):
        key = name.removeprefix("transformer.")
        if IGNORED_BUFFERS.search(key):
            continue
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()  # row-major [out, in]: the layout gpt2lab's kernels read
        out[key] = tensor
    return out


def gpt2lab_to_hf(state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Our names -> HF ``GPT2LMHeadModel`` names (Conv1D layout); contiguous copies for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        name = key if key.startswith("lm_head.") else f"transformer.{key}"
        out[name] = tensor.detach().contiguous().cpu()
    if not tie_word_embeddings and "lm_head.weight" not in out:
        raise CheckpointError("untied model without lm_head.weight")
    return out


def check_tensor_names(source: object, config_source: object, missing: list[str], unexpected: list[str]) -> None:
    """Raise :class:`CheckpointError` naming ``source`` when a checkpoint lacks or adds tensors."""
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: does not match {config_source}: {'; '.join(detail)}")
