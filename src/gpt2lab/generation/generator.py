"""The :class:`Generator`: a loaded model with its tokenizer, the object every front end talks to."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoints import load_model, resolve_model, save_model
from ..model import GPT2, GPT2Config
from ..tokenizer import Tokenizer, TokenizerError, gpt2_tokenizer_dir


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


class Generator:
    """A GPT-2 model, its tokenizer and the name it was loaded by."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, name: str = "model",
                 path: Path | None = None, tokenizer_dir: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.tokenizer_dir = tokenizer_dir

    @property
    def config(self) -> GPT2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def __repr__(self) -> str:
        c = self.config
        return (f"Generator(name={self.name!r}, n_layer={c.n_layer}, n_embd={c.n_embd}, "
                f"params={self.model.num_parameters() / 1e6:.1f}M, device={self.device})")

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits ``[len(token_ids), vocab_size]`` at every position, computed without the KV cache."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence of ints, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size - 1}]")
        return self.model(ids[None])[0].float()

    def save(self, path: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
        """Write the model and tokenizer in Hugging Face layout (loads back with ``transformers``)."""
        return save_model(self.model, path, tokenizer_dir=self.tokenizer_dir, dtype=_parse_dtype(dtype))


def load_tokenizer(directory: Path, vocab_size: int) -> tuple[Tokenizer, Path]:
    """The checkpoint's own tokenizer; GPT-2's when a 50257-token checkpoint ships none."""
    try:
        return Tokenizer.from_dir(directory), directory
    except TokenizerError:
        if vocab_size != 50257:
            raise
        print(f"gpt2lab: {directory} has no tokenizer files; using GPT-2's tokenizer", file=sys.stderr)
        return Tokenizer.gpt2(), gpt2_tokenizer_dir()


def load(model: str | Path | None = None, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> Generator:
    """Load a GPT-2 checkpoint: a local directory, a bundled model, or a Hugging Face Hub id.

    ``model=None`` asks for ``gpt2`` and falls back to the bundled model when offline.
    """
    resolved = resolve_model(model)
    net = load_model(resolved.path, device=device, dtype=_parse_dtype(dtype))
    tokenizer, tokenizer_dir = load_tokenizer(resolved.path, net.config.vocab_size)
    return Generator(net, tokenizer, name=resolved.name, path=resolved.path, tokenizer_dir=tokenizer_dir)
