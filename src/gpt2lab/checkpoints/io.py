"""Reading and writing GPT-2 checkpoints in Hugging Face layout.

A checkpoint directory holds ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and the
tokenizer files. HF GPT-2 stores its projections as ``Conv1D`` (weight ``[in, out]``); our model uses
``nn.Linear`` (``[out, in]``), so those four weights per block are transposed on the way in and out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model import GPT2, ConfigError, GPT2Config, check_quantization

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# buffers older HF versions stored in checkpoints; derived from the config, never loaded
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a pickled checkpoint cannot run code when loaded
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every parser error means the same to the user
        size = path.stat().st_size
        raise CheckpointError(f"{path}: cannot read weights ({size} bytes; truncated or corrupt?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def weights_file(directory: Path) -> Path:
    """The weights file of a checkpoint directory, safetensors preferred."""
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE} or {BIN_FILE} in this directory")


def hf_to_gpt2lab(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF ``GPT2LMHeadModel``/``GPT2Model`` tensor names and layouts to ours."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = name.removeprefix("transformer.")
        if _IGNORED.search(key):
            continue
        if key.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()  # row-major [out, in]: the layout gpt2lab's kernels read
        out[key] = tensor
    return out


def gpt2lab_to_hf(state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Our names -> HF ``GPT2LMHeadModel`` names (Conv1D layout); contiguous copies for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        name = key if key.startswith("lm_head.") else f"transformer.{key}"
        out[name] = tensor.detach().contiguous().cpu()
    if not tie_word_embeddings and "lm_head.weight" not in out:
        raise CheckpointError("untied model without lm_head.weight")
    return out


def load_model(directory: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, quantization: str | None = None) -> GPT2:
    """Build a :class:`GPT2` from a HF-layout directory, checking every tensor against the config.

    ``quantization``: ``"int8"`` or ``"bf16"`` quantizes the weights while loading, one tensor at a
    time (:func:`gpt2lab.checkpoints.quantized.load_quantized`); ValueError for other values.
    """
    quantization = check_quantization(quantization)
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: file not found (not a GPT-2 checkpoint directory?)")
    try:
        config = GPT2Config.from_json(config_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    path = weights_file(directory)
    if quantization is not None:
        from .quantized import load_quantized

        return load_quantized(config, path, quantization, device=device, config_source=config_path)
    state = hf_to_gpt2lab(_read_tensors(path))
    # Meta tensors skip the random init of big models, but their first use costs ~2 s of one-time
    # setup; small models (the bundled one, gpt2 small/medium) initialise faster on the CPU.
    approx_params = config.n_embd * (config.vocab_size + config.n_positions + 12 * config.n_embd * config.n_layer)
    with torch.device("meta") if approx_params > 400_000_000 else contextlib.nullcontext():
        model = GPT2(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: same tensor as wte
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path}: does not match {config_path}: {'; '.join(detail)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)} but {config_path} implies "
                f"{tuple(expected[key].shape)}")
    target_dtype = dtype or torch.float32  # fp16-stored checkpoints load as fp32 unless asked
    state = {k: v.to(dtype=target_dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.to(device)
    model.eval()
    return model


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_dir(target: str | Path, fill) -> Path:
    """Create directory ``target`` by calling ``fill(tmpdir)`` and renaming it into place.

    A crash at any moment leaves either the previous ``target`` or the complete new one, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_model(model: GPT2, directory: str | Path, *, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` in HF layout (atomically) so ``transformers`` loads it back unchanged.

    ``tokenizer_dir``: copy the tokenizer files found there. ``dtype``: storage dtype (e.g. fp16).
    ``extra_files``: more text files to write (name -> content), e.g. a model card.
    """
    from safetensors.torch import save_file

    config = model.config
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
        save_file(gpt2lab_to_hf(state, config.tie_word_embeddings), str(tmp / SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file() and name != "generation_config.json":
                    shutil.copyfile(src, tmp / name)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content, encoding="utf-8")

    return write_atomic_dir(directory, fill)
