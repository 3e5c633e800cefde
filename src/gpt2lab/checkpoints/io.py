"""Reading and writing GPT-2 checkpoints in Hugging Face layout.

A checkpoint directory holds ``config.json``, the weights and the tokenizer files. The weights are one
``model.safetensors`` (or ``pytorch_model.bin``), or shards named by an index
(``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``, as ``save_pretrained(max_shard_size=...)``
writes them). Saving writes what ``transformers`` writes: ``config.json`` with ``torch_dtype``,
``generation_config.json``, the tokenizer files with ``tokenizer_config.json``, a model card (README.md),
and shards with an index when the weights exceed ``max_shard_size``, all through
:mod:`gpt2lab.atomic` (a folder is swapped in whole). Weight files are read by the one tensor reader,
:func:`read_tensors` (in :mod:`.tensors`, with the HF <-> gpt2lab name mapping; imported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import crash_point, write_dir, write_file
from ..errors import CheckpointError
from ..model import GPT2, ConfigError, GPT2Config
from ..model.gpt2 import meta_skeleton
from ..placement import STORED_DTYPES, check_quantization, storage_dtype
from ..readers import ReadError, read_json
from .tensors import (
    CONV1D_SUFFIXES,
    IGNORED_BUFFERS,
    SAFETENSORS_DTYPES,
    check_tensor_names,
    gpt2lab_to_hf,
    hf_to_gpt2lab,
    read_tensors,
    safetensors_shapes,
)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)  # in order of preference
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
MODEL_CARD_FILE = "README.md"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", TOKENIZER_CONFIG_FILE,
                   SPECIAL_TOKENS_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)
DEFAULT_MAX_SHARD_SIZE = "5GB"  # huggingface_hub's and transformers' default


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(read_tensors(path))


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Our tensor names and shapes for ``config``, from one block built on the meta device (no memory)."""
    with meta_skeleton():
        one = GPT2(dataclasses.replace(config, n_layer=1))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in one.state_dict().items():
        if name.startswith("h.0."):
            for i in range(config.n_layer):
                shapes[f"h.{i}.{name[4:]}"] = tuple(tensor.shape)
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


def check_shapes(config: GPT2Config, shapes: Mapping[str, Sequence[int]], weights: str | Path,
                 config_path: str | Path) -> None:
    """Check HF-named tensor ``shapes`` (a safetensors header, or the union of a sharded checkpoint's)
    against ``config`` before anything is allocated; :class:`CheckpointError` names both files."""
    ours: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        key = name.removeprefix("transformer.")
        if IGNORED_BUFFERS.search(key):
            continue
        ours[key] = tuple(reversed(tuple(shape))) if key.endswith(CONV1D_SUFFIXES) else tuple(shape)
    check_state_shapes(config, ours, weights, config_path)


def check_state_shapes(config: GPT2Config, shapes: Mapping[str, Sequence[int]], weights: str | Path,
                       config_path: str | Path) -> None:
    """:func:`check_shapes` for our tensor names and layouts (after :func:`hf_to_gpt2lab`)."""
    ours = {key: tuple(shape) for key, shape in shapes.items()}
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)  # tied: the same tensor as wte
    blocks = {int(m.group(1)) for key in ours if (m := re.match(r"h\.(\d+)\.", key))}
    if blocks != set(range(config.n_layer)):  # before listing n_layer blocks of names, however big
        found = f"blocks h.0-h.{max(blocks)}" if blocks == set(range(len(blocks))) and blocks else \
            f"{len(blocks)} blocks"
        raise CheckpointError(f"{weights}: has {found} but {config_path} says n_layer={config.n_layer}")
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    check_tensor_names(weights, config_path, missing, unexpected)
    for key, shape in ours.items():
        if shape != expected[key]:
            raise CheckpointError(f"{weights}: tensor {key} has shape {shape} but {config_path} implies "
                                  f"{expected[key]}")


def _read_index(index: Path) -> list[Path]:
    """The shard files an index names, in order of first appearance, each checked to exist."""
    try:
        weight_map = read_json(index)["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except ReadError as exc:  # not JSON, nested too deep ...: named by the reader
        raise CheckpointError(f"{exc}; expected a shard index (a JSON object with a 'weight_map')") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index (expected a JSON object with a "
                              f"'weight_map' of tensor name -> shard file): {exc}") from exc
    if not shards or not all(isinstance(s, str) and "/" not in s and s not in (".", "..") for s in shards):
        raise CheckpointError(f"{index}: weight_map must name shard files in the same folder, got {shards[:3]}")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0]} not found ({len(missing)} of {len(shards)} missing)")
    return [index.parent / s for s in shards]


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: one file, or the shards its index names.

    Preference: ``model.safetensors``, its sharded index, ``pytorch_model.bin``, its sharded index
    (transformers' order). Raises :class:`CheckpointError` when there are none or a shard is missing.
    """
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return _read_index(path) if name.endswith(".index.json") else [path]
    raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE} or {BIN_FILE} in this directory "
                          f"(nor a sharded {SAFETENSORS_INDEX} / {BIN_INDEX})")


def weights_file(directory: Path) -> Path:
    """The weights file of a checkpoint directory (the index of a sharded one), safetensors preferred."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    weight_files(directory)  # raises the error
    raise AssertionError("unreachable")


def iter_checkpoint_tensors(directory: str | Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """``(file, tensors)`` for each weight file of ``directory`` in turn (one shard in memory at a time)."""
    for path in weight_files(directory):
        yield path, _read_tensors(path)


def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: what ``dtype="auto"`` loads, as in ``transformers``.

    ``config.json``'s ``torch_dtype`` (``dtype`` in transformers 5) when it names a float type, else the
    dtype of the first floating-point tensor of the weights (read from the safetensors header without
    loading the data), else float32.
    """
    directory = Path(directory)
    try:
        raw = read_json(directory / CONFIG_FILE)
    except (OSError, ValueError):
        raw = {}
    for key in ("torch_dtype", "dtype"):
        name = raw.get(key) if isinstance(raw, dict) else None
        if isinstance(name, str) and name.removeprefix("torch.") in STORED_DTYPES:
            return STORED_DTYPES[name.removeprefix("torch.")]
    first = weight_files(directory)[0]
    if first.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(first), framework="pt") as fh:
                for key in fh.keys():
                    found = SAFETENSORS_DTYPES.get(fh.get_slice(key).get_dtype())
                    if found is not None and found.is_floating_point:
                        return found
        except Exception as exc:  # noqa: BLE001 - as in _read_tensors
            raise CheckpointError(f"{first}: cannot read weights (truncated or corrupt?): {exc}") from exc
        return torch.float32
    for tensor in _read_tensors(first).values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def read_config(directory: str | Path) -> GPT2Config:
    """The :class:`GPT2Config` of a checkpoint folder's ``config.json``; :class:`CheckpointError` naming the file
    when it is missing or not a GPT-2 config."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: file not found (not a GPT-2 checkpoint directory?)")
    try:
        return GPT2Config.from_json(config_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def load_model(directory: str | Path, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, quantization: str | None = None) -> GPT2:
    """Build a :class:`GPT2` from a HF-layout directory (one weights file or shards), checking every
    tensor against the config.

    ``dtype``: the dtype to hold the weights in; ``None`` is float32 (an fp16-stored checkpoint is
    upcast), ``"auto"`` keeps the checkpoint's own (:func:`checkpoint_dtype`).
    ``quantization``: ``"int8"``, ``"int4"`` or ``"bf16"`` quantizes the weights while loading, one tensor at a
    time (:func:`gpt2lab.checkpoints.quantized.load_quantized`; ``dtype`` is then unused); ValueError
    for other values.
    """
    quantization = check_quantization(quantization)
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = read_config(directory)
    files = weight_files(directory)
    if all(f.suffix == ".safetensors" for f in files):  # headers only: a mismatch fails before any allocation
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            shapes.update(safetensors_shapes(f))
        check_shapes(config, shapes, weights_file(directory), config_path)
    if quantization is not None:
        from .quantized import load_quantized

        return load_quantized(config, files, quantization, device=device, source=weights_file(directory),
                              config_source=config_path)
    dtype = storage_dtype(dtype, lambda: checkpoint_dtype(directory))
    return model_from_tensors(config, (tensors for _, tensors in iter_checkpoint_tensors(directory)), dtype=dtype,
                       device=device, source=str(weights_file(directory)), config_source=str(config_path))


def model_from_tensors(config: GPT2Config, shards: Iterable[Mapping[str, torch.Tensor]], *,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                source: str = "weights", config_source: str = "config") -> GPT2:
    """A :class:`GPT2` of ``config`` holding the HF-named tensors of ``shards`` (one mapping per shard,
    converted to ``dtype``, default float32, before the next is read), every tensor checked against the
    config. ``source`` / ``config_source`` name the weights and the config in errors."""
    target_dtype = dtype or torch.float32  # fp16-stored checkpoints load as fp32 unless asked
    state: dict[str, torch.Tensor] = {}
    for tensors in shards:
        for key, tensor in hf_to_gpt2lab(tensors).items():
            state[key] = tensor.to(dtype=target_dtype) if tensor.is_floating_point() else tensor
        del tensors
    check_state_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, source, config_source)
    # A skeleton of meta tensors, every one replaced by load_state_dict(assign=True) below: no random
    # initialisation that the checkpoint overwrites (0.1 s of `gpt2lab generate` on the bundled model)
    with meta_skeleton():
        model = GPT2(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: same tensor as wte
    model.load_state_dict(state, assign=True)
    model.to(device)
    model.eval()
    return model


@contextlib.contextmanager
def _write_errors_as_os_errors(path: Path) -> Iterator[None]:
    """safetensors reports a failed write (a full disk ...) as ``SafetensorError``: raise the ``OSError``
    it is, so the CLI says it in one line."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _tokenizer_config(tokenizer_dir: Path | None, n_positions: int) -> dict[str, Any]:
    """The source's ``tokenizer_config.json`` (if any) completed so ``AutoTokenizer`` knows the context
    (``model_max_length`` = ``n_positions``; without it transformers reports 1e30) and GPT-2's specials."""
    cfg: dict[str, Any] = {}
    src = tokenizer_dir / TOKENIZER_CONFIG_FILE if tokenizer_dir is not None else None
    if src is not None and src.is_file():
        try:
            cfg = read_json(src, expect=dict)
        except ValueError:
            cfg = {}  # a broken file is replaced by a good one
    limit = cfg.get("model_max_length")
    if not isinstance(limit, int) or not 0 < limit <= n_positions:
        cfg["model_max_length"] = n_positions
    cfg.setdefault("tokenizer_class", "GPT2Tokenizer")
    cfg.setdefault("add_prefix_space", False)
    vocab_files = [tokenizer_dir / n for n in ("tokenizer.json", "vocab.json")] if tokenizer_dir is not None else []
    if any(f.is_file() and '"<|endoftext|>"' in f.read_text(encoding="utf-8", errors="replace")
           for f in vocab_files):
        for key in ("bos_token", "eos_token", "unk_token"):
            cfg.setdefault(key, "<|endoftext|>")
    return cfg


def write_chat_template(directory: str | Path, template: str, model_max_length: int) -> None:
    """Put ``template`` into ``directory/tokenizer_config.json`` under ``chat_template`` (transformers'
    key), creating a GPT-2 tokenizer config when there is none; a ``chat_template.jinja`` there (which
    transformers would prefer) is removed so the two cannot disagree."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    config: dict = {}
    if path.is_file():
        try:
            config = read_json(path, expect=dict)
        except ValueError:
            config = {}
    if not isinstance(config, dict) or not config:
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": model_max_length}
    config["chat_template"] = template
    write_file(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (Path(directory) / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)


def save_model(model: GPT2, directory: str | Path, *, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None,
               generation_config: Mapping[str, Any] | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, card: str | None = None,
               chat_template: str | None = None) -> Path:
    """Write ``model`` in HF layout so ``transformers`` loads it back unchanged, atomically: the folder
    is filled under a temporary name and swapped in (:func:`gpt2lab.atomic.write_dir`), so at every
    instant ``directory`` holds the previous complete model or the new one.

    ``tokenizer_dir``: copy the tokenizer files found there (``tokenizer_config.json`` completed with
    ``model_max_length`` = ``n_positions``). ``dtype``: storage dtype (e.g. fp16; recorded as
    ``torch_dtype`` in ``config.json``). ``generation_config``: the ``generation_config.json`` fields
    (default: the model's bos/eos ids). ``max_shard_size`` (bytes or ``"5GB"``-style): larger weights are
    split into ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` by
    ``huggingface_hub.save_torch_state_dict``. ``card``: the model card (README.md); default: a short
    card saying how the folder was made. ``extra_files``: more text files to write (name -> content).
    ``chat_template``: the Jinja chat template to record in ``tokenizer_config.json``. Raises
    ``OSError`` naming the file that could not be written (a full disk ...), ``NotADirectoryError``
    when ``directory`` is a file. Crash stages (tests): ``model.writing`` (part of the files written)
    and ``model.`` + :data:`gpt2lab.atomic.DIR_STAGES`.
    """
    kwargs = dict(tokenizer_dir=tokenizer_dir, dtype=dtype, extra_files=extra_files,
                  generation_config=generation_config, max_shard_size=max_shard_size, card=card,
                  chat_template=chat_template)
    return write_dir(directory, lambda tmp: write_model_files(model, tmp, **kwargs), scope="model")


def write_model_files(model: GPT2, folder: str | Path, *, tokenizer_dir: str | Path | None = None,
                      dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None,
                      generation_config: Mapping[str, Any] | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, card: str | None = None,
                      chat_template: str | None = None) -> None:
    """The files of :func:`save_model` written into the existing folder ``folder``, not atomically:
    for a folder that an atomic write fills (:func:`save_model`, a training run's published model)."""
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    config = model.config
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    stored = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if card is None and MODEL_CARD_FILE not in (extra_files or {}):
        from .card import model_card

        card = model_card(how="Saved with gpt2lab.", config=config, dtype=stored)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(stored).removeprefix("torch.")
    _write_json(folder / CONFIG_FILE, hf_config)
    crash_point("model.writing")
    with _write_errors_as_os_errors(folder):
        save_torch_state_dict(gpt2lab_to_hf(state, config.tie_word_embeddings), folder,
                              max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            src = tok_dir / name
            if src.is_file() and name not in (GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE):
                shutil.copyfile(src, folder / name)
        tok_cfg = _tokenizer_config(tok_dir, config.n_positions)
        _write_json(folder / TOKENIZER_CONFIG_FILE, tok_cfg)
        if not (folder / SPECIAL_TOKENS_FILE).is_file() and "eos_token" in tok_cfg:
            _write_json(folder / SPECIAL_TOKENS_FILE, {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token")})
    gen_cfg = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    gen_cfg.update(generation_config or {})
    _write_json(folder / GENERATION_CONFIG_FILE, gen_cfg)
    if card is not None:
        (folder / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
    for name, content in (extra_files or {}).items():
        (folder / name).write_text(content, encoding="utf-8")
    if chat_template is not None:
        write_chat_template(folder, chat_template, config.n_positions)


def _write_json(path: Path, obj: Any) -> None:  # inside a folder that is written atomically as a whole
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
