"""GPT-2 in one file, nanoGPT/gpt-fast style.

Parameter names follow Hugging Face's ``GPT2LMHeadModel`` without the ``transformer.`` prefix
(``wte``, ``h.0.attn.c_attn``, ...), so checkpoints map by name. Unlike HF's Conv1D, every
projection is a plain ``nn.Linear`` (weight ``[out, in]``); the checkpoint loader transposes.

Two ways to run it:
- ``model(idx)``: a plain causal forward over whole sequences (training, scoring, parity tests);
- ``model(idx, input_pos=...)`` after ``model.setup_cache(...)``: cached inference. Every row of the
  batch carries its own positions, so rows of different lengths share one batch without left padding: a
  row's position ``p`` is also its slot ``p`` in the static cache, and a query attends to slots ``<= p``.

This is the model only (config, modules, KV cache): who runs it, on gpt2lab's C kernels, CUDA graphs or
this PyTorch code, is decided by :mod:`gpt2lab.runtime`, which keeps its state outside the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..readers import read_json


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``: GELU with the tanh approximation. A named function, not a lambda, so that a
    whole model pickles (``torch.save(model)``, multiprocessing)."""
    return F.gelu(x, approximate="tanh")


# activation names accepted in config.json -> our implementation. GPT-2 checkpoints use "gelu_new"
# (the tanh approximation); the others appear in community fine-tunes of the same architecture.
_ACTIVATIONS = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@contextlib.contextmanager
def meta_skeleton() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers (transformers' ``no_init_weights``
    trick): initialising meta tensors goes through PyTorch's reference ops, whose first use imports
    ``torch._dynamo`` (seconds of start-up for nothing). Use for shapes and for models filled by
    ``load_state_dict(..., assign=True)``."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


class ConfigError(ValueError):
    """A config.json that describes something this GPT-2 implementation does not support."""


class InferenceOnlyError(RuntimeError):
    """Training mode requested on a model that can only run inference (a quantized one, ``quantize.quantize_``)."""


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # dropout only matters for training; inference runs the model in eval mode
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in _ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json`` dict, rejecting settings we cannot honour."""
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"model_type is {model_type!r}; gpt2lab runs GPT-2 checkpoints (model_type 'gpt2')")
        if raw.get("add_cross_attention"):
            raise ConfigError("add_cross_attention=true (encoder-decoder GPT-2) is not supported")
        # HF aliases
        aliases = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                   "max_position_embeddings": "n_positions"}
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            key = aliases.get(key, key)
            if key in known and value is not None or key == "n_inner":
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> GPT2Config:
        path = Path(path)
        try:
            raw = read_json(path, expect=dict)
        except ValueError as exc:  # the reader's message names the file: not JSON, nested too deep ...
            raise ConfigError(str(exc)) from None
        try:
            return cls.from_dict(raw)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that ``transformers.GPT2LMHeadModel`` reads back."""
        d = asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        return d


def _cache_layout(input_pos: torch.Tensor) -> tuple[int, int | None]:
    """``(kv_len, start)`` of a cached step; ``start`` is set when all rows write one contiguous span.

    One host sync per forward (``tolist``), instead of several per layer.
    """
    rows = input_pos.tolist()
    first = rows[0]
    start = first[0]
    kv_len = max(max(r) for r in rows) + 1
    if first != list(range(start, start + len(first))) or any(r != first for r in rows):
        return kv_len, None
    return kv_len, start


class KVCache(nn.Module):
    """Static, preallocated key/value cache for one layer (gpt-fast's ``KVCache``).

    Shape ``[max_batch, n_head, max_seq, head_dim]``. Rows are independent sequences; a row's
    token at position ``p`` lives in slot ``p``.
    """

    def __init__(self, max_batch: int, n_head: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_batch, n_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: slice, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ``[B, H, T, D]`` at ``input_pos [B, T]`` of cache ``rows``; return slots ``[:kv_len]``.

        ``start``: set when every row writes the same contiguous span ``start..start+T-1`` (a prefill,
        or a decode step with all rows at one position), which is one slice copy instead of a scatter.
        """
        k_rows, v_rows = self.k[rows], self.v[rows]
        if start is not None:
            T = k.shape[2]
            k_rows[:, :, start:start + T] = k
            v_rows[:, :, start:start + T] = v
        else:  # ragged rows: scatter per row
            B, T = input_pos.shape
            b_idx = torch.arange(B, device=input_pos.device)[:, None].expand(B, T)
            k_rows[b_idx, :, input_pos] = k.transpose(1, 2)
            v_rows[b_idx, :, input_pos] = v.transpose(1, 2)
        return k_rows[:, :, :kv_len], v_rows[:, :, :kv_len]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Move one sequence to another row (used to keep active rows contiguous)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def reorder(self, index: torch.Tensor, length: int) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beam search)."""
        n = index.numel()
        self.k[:n, :, :length] = self.k[index, :, :length]
        self.v[:n, :, :length] = self.v[index, :, :length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = 1.0
        if config.scale_attn_weights:
            scale = self.head_dim ** -0.5
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                rows: slice, kv_len: int, start: int | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each [B, T, C]
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        dropout = self.attn_dropout if self.training else 0.0
        if input_pos is None:  # plain causal forward over whole sequences
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale)
        else:
            assert self.kv_cache is not None, "call model.setup_cache() before cached inference"
            k, v = self.kv_cache.update(rows, input_pos, k, v, kv_len, start)
            if T == 1 and not self.training:
                # one query per row (a decode step): the plain math is several times faster on CPU
                # than SDPA's flash kernel, which is tuned for long query blocks
                att = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, 1, kv_len]
                if mask is not None:
                    att = att.masked_fill(~mask, float("-inf"))
                y = att.softmax(dim=-1) @ v  # [B, H, 1, D]
            else:
                # mask None (set by GPT2.forward): queries see every slot < kv_len, causally when T > 1
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                   dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y  # skip a no-op module call per layer


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)
        self.act = _ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(x) if self.training else x


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                rows: slice, kv_len: int, start: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, input_pos, rows, kv_len, start)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # The LM head reads the embedding matrix directly when tied (GPT-2's default), so there is
        # exactly one [vocab, n_embd] parameter; untied checkpoints get their own.
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.max_batch = self.max_seq = 0
        self.quantization: str | None = None  # "int8" / "bf16" once quantize.quantize_ swapped the weights

    def train(self, mode: bool = True) -> GPT2:
        if mode and self.quantization is not None:
            raise InferenceOnlyError(f"this GPT2 is {self.quantization}-quantized and can only run inference; load "
                                     f"the checkpoint without quantization to train it")
        return super().train(mode)

    # -- construction -------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2's initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 * n_layer))."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def num_parameters(self) -> int:
        # quantized modules (model/quantize.py) hold their weights as buffers, outside parameters()
        quantized = sum(m.weight.numel() for m in self.modules() if getattr(m, "is_quantized", False))
        return sum(p.numel() for p in self.parameters()) + quantized

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's fp32 weight ``[V, C]`` (the tied embedding unless untied; dequantized, a copy,
        when quantized: use :meth:`head_logits` to apply the head)."""
        head = self.wte if self.lm_head is None else self.lm_head
        return head.dequantized() if getattr(head, "is_quantized", False) else head.weight

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` of final hidden states ``[..., C]`` (the LM head, tied or not, quantized or not)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if getattr(self.wte, "is_quantized", False):
            return self.wte.linear(hidden)
        return F.linear(hidden, self.wte.weight)

    # -- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, max_batch: int, max_seq: int | None = None) -> None:
        """Preallocate the static KV cache (no-op when the current one is big enough)."""
        max_seq = max_seq or self.config.n_positions
        if max_seq > self.config.n_positions:
            raise ValueError(f"max_seq {max_seq} exceeds the model's context n_positions={self.config.n_positions}")
        if max_batch <= self.max_batch and max_seq <= self.max_seq:
            return
        param = self.wpe.weight  # float even when the other weights are quantized
        for block in self.h:
            block.attn.kv_cache = KVCache(max_batch, self.config.n_head, max_seq, self.config.head_dim,
                                          dtype=param.dtype, device=param.device)
            block.attn.kv_cache.training = self.training
        self.max_batch, self.max_seq = max_batch, max_seq

    def caches(self) -> list[KVCache]:
        return [block.attn.kv_cache for block in self.h]  # type: ignore[misc]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, rows: slice | None = None,
                logits_index: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Logits for token ids ``idx [B, T]``.

        ``input_pos [B, T]``: positions (= cache slots) of each token; enables the KV cache.
        ``rows``: which cache rows the batch occupies (default: the first B).
        ``logits_index [B]``: compute logits only at this position of each row -> ``[B, V]``
        (generation needs just the next-token logits; the LM head is the largest matmul).
        Returns ``[B, T, V]`` otherwise.
        ``kv_len``: with ``input_pos``, how many cache slots attention reads (more than every position),
        given by the caller. The forward then reads nothing back to the host and every shape depends on
        ``idx``'s and ``kv_len`` alone (a static-shape step, which a CUDA graph can capture): keys and values
        are scattered per row and each query is masked by its own position. Without it, the forward reads
        the positions once (one host sync) to take the cheapest layout.

        Raises ValueError for a sequence longer than ``n_positions`` (uncached), or positions / ``kv_len``
        beyond the KV cache; ``kv_len`` without ``input_pos`` is a ValueError too.

        This is the model's own PyTorch code, always; :mod:`gpt2lab.runtime` decides when a cached
        forward runs on gpt2lab's C kernels or a CUDA graph instead (the same logits within fp32 rounding).
        """
        x = self.hidden_states(idx, input_pos=input_pos, rows=rows, kv_len=kv_len)  # [B, T, C]
        if logits_index is not None:
            x = x[torch.arange(x.shape[0], device=idx.device), logits_index]  # [B, C]
        return self.head_logits(x)  # [B, T, V] or [B, V]

    def hidden_states(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                      rows: slice | None = None, kv_len: int | None = None) -> torch.Tensor:
        """The final hidden states ``[B, T, C]`` (after ``ln_f``, before the LM head); arguments as in
        :meth:`forward`. Scoring applies the head itself, in chunks, at the positions it needs."""
        B, T = idx.shape
        mask = None
        start = None
        if input_pos is None:
            if kv_len is not None:
                raise ValueError("kv_len is the cached forward's: give input_pos with it")
            kv_len = 0
            if T > self.config.n_positions:
                raise ValueError(f"sequence length {T} exceeds n_positions={self.config.n_positions}")
            pos = torch.arange(T, device=idx.device)[None]  # [1, T]
        else:
            pos = input_pos
            if kv_len is None:
                kv_len, start = _cache_layout(input_pos)
            if kv_len > self.max_seq:
                raise ValueError(f"position {kv_len - 1} is beyond the KV cache ({self.max_seq} slots)")
            # No mask when it would be all-causal from slot 0 (prefill from 0, or every row decoding at
            # the same position): SDPA is faster without one and the result is the same. (kv_len given:
            # no layout was read, start is None, every query is masked.)
            if start is None or (start != 0 and T > 1):
                slots = torch.arange(kv_len, device=idx.device)
                mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
        rows = rows if rows is not None else slice(0, B)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, C]
        for block in self.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, input_pos, rows, kv_len, start,
                                                      use_reentrant=False)
            else:
                x = block(x, mask, input_pos, rows, kv_len, start)
        return self.ln_f(x)
