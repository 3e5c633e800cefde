"""Weight-only quantization of :class:`GPT2`, as a swap of modules (gpt-fast's ``WeightOnlyInt8Linear``).

``quantization="int8"`` (vLLM's option name): every block projection holds int8 weights with one symmetric
fp32 scale per output row (per channel; ``w ≈ q * scale``, ``scale = max|w_row| / 127``); the token embedding
and LM head (tied or not) bf16 (:data:`LM_HEAD_QUANTIZATION` says why; ``quantize_(..., lm_head="int8")``
makes them int8 too). Their products run on integers: each input row is quantized to int16 with one scale
(``max|x| / 32767``) and the int8 x int16 products are summed exactly (:func:`int8_linear`; why in
``kernels.c``). A decode step of GPT-2 124M reads about 165 MB instead of 500 MB (125 MB with an int8 head).
``quantization="int4"``: the block projections hold 4-bit weights, symmetric, with one fp32 scale per group
of :data:`INT4_GROUP_SIZE` inputs of a row (llama.cpp's Q4_0 rule: the group's largest-magnitude weight maps to
-8), packed two to a byte (:func:`int4_shapes`); the head as int8's. Their products take the same int16 rows
and sum exactly per group (:func:`int4_linear`). About 43 MB of block weights per token of GPT-2 124M
(int8: 85 MB). ``quantization="bf16"``: the same modules store bfloat16 weights (16-bit storage, fp32
arithmetic: AVX2 has no bf16 math).

The quantized modules run through gpt2lab's C kernels (``gpt2lab.kernels.linear``, and the whole cached
forward through ``gpt2lab.runtime``'s ``KernelRunner``); without the kernels, on CPU, :func:`int8_linear`
and :func:`int4_linear` compute the same numbers bit for bit with PyTorch (slower), and on other devices they
dequantize on the fly. A quantized model is inference-only: ``model.train()`` raises :class:`InferenceOnlyError`.

``state_dict()`` presents the dequantized fp32 weights under ``nn.Linear``'s names, so
``save_model`` writes a Hugging Face checkpoint, and ``load_state_dict`` quantizes fp32 weights as
they come (which is how ``checkpoints.load_model(..., quantization=...)`` loads tensor by tensor).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels import int4_shapes
from ..placement import check_quantization
from .gpt2 import GPT2, GPT2Config, InferenceOnlyError, meta_skeleton

# What the token embedding and LM head (one tensor when tied) get under each quantization. int8 keeps them in
# bf16, as transformers' bitsandbytes integration and GPTQ/AWQ keep lm_head unquantized by default: the
# logits are where weight error turns into changed tokens. Measured on the bundled model (20 greedy
# 64-token continuations of Hamlet lines identical to fp32's): int8 head 16/20, bf16 head 18/20, fp32
# head 19/20; the head's rms weight error is 3.3x smaller in bf16; group-wise int8 scales (64) barely
# reduce it (1.15e-3 -> 1.05e-3), the embedding rows having no outliers. Cost: 38.6 MB more per token
# for GPT-2's 50257 x 768 head.
LM_HEAD_QUANTIZATION = {"int8": "bf16", "bf16": "bf16", "int4": "bf16"}
HEAD_QUANTIZATIONS = ("int8", "bf16")  # what the embedding / head can hold (a packed int4 row is no embedding row)
INT4_GROUP_SIZE = kernels.INT4_GROUP_SIZE  # inputs per int4 scale: kernels.c's Q4_GROUP (the measurement is there)
_STORAGE = {"int8": torch.int8, "bf16": torch.bfloat16, "int4": torch.uint8}
_CHUNK_ROWS = 2048  # rows quantized at a time


def quantize_weight(weight: torch.Tensor, quantization: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(stored, scales)`` for a float ``weight [out, in]``: int8 with fp32 ``scales [out]`` (symmetric,
    per output row, rounded to nearest, so ``|w - q * scale| <= scale / 2``), packed int4 with fp32
    ``scales [out, groups]`` (:func:`int4_shapes`; symmetric per group, ``q`` in [-8, 7]), or bf16 and None."""
    weight = weight.detach()
    n_out, n_in = weight.shape
    if weight.is_meta:  # a skeleton's (load_quantized): shapes only. PyTorch's meta kernels for the arithmetic
        # below are Python references whose first use imports torch._dynamo, 1.5 s of every quantized load
        if quantization == "int4":
            packed, groups = int4_shapes(n_out, n_in)
            return torch.empty(packed, dtype=torch.uint8, device="meta"), torch.empty(groups, device="meta")
        return (torch.empty(weight.shape, dtype=_STORAGE[quantization], device="meta"),
                torch.empty(n_out, device="meta") if quantization == "int8" else None)
    if quantization == "bf16":
        return weight.to(torch.bfloat16).contiguous(), None
    if quantization == "int4":
        return _quantize_int4(weight)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n_out, dtype=torch.float32, device=weight.device)
    for start in range(0, n_out, _CHUNK_ROWS):  # chunks: temporaries stay small (peak memory at load)
        rows = weight[start:start + _CHUNK_ROWS].to(torch.float32)
        amax = rows.abs().amax(dim=1)
        # an all-zero row keeps 1; a row holding NaN gets a NaN scale (inf: an inf one), so its outputs are
        # NaN as the float weight's would be, never finite numbers (NaN > 0 is False: it used to get 1)
        chunk_scales = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
        q[start:start + _CHUNK_ROWS] = torch.round(rows / chunk_scales[:, None]).nan_to_num_(0.0).clamp_(-127, 127)
        scales[start:start + _CHUNK_ROWS] = chunk_scales
    return q, scales


def _quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_0 rule per group of :data:`INT4_GROUP_SIZE` inputs: ``scale = m / -8`` for the group's
    weight ``m`` of largest magnitude (so ``m`` is exactly -8 steps and all 16 levels are used), ``q =
    clamp(round(w / scale), -8, 7)``. A group holding NaN gets a NaN scale (its outputs NaN, as int8's rows);
    an all-zero group the scale 1."""
    n_out, n_in = weight.shape
    (_, n_bytes), (_, n_groups) = int4_shapes(n_out, n_in)
    packed = torch.empty(n_out, n_bytes, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n_out, n_groups, dtype=torch.float32, device=weight.device)
    for start in range(0, n_out, _CHUNK_ROWS):
        rows = weight[start:start + _CHUNK_ROWS].to(torch.float32)
        r = rows.shape[0]
        rows = F.pad(rows, (0, n_groups * INT4_GROUP_SIZE - n_in)).view(r, n_groups, INT4_GROUP_SIZE)
        extreme = rows.gather(2, rows.abs().argmax(2, keepdim=True))[..., 0]  # argmax picks a NaN if there is one
        chunk_scales = torch.where(extreme == 0, torch.ones_like(extreme), extreme / -8.0)
        q = torch.round(rows / chunk_scales[..., None]).nan_to_num_(0.0).clamp_(-8, 7).add_(8).to(torch.uint8)
        q = F.pad(q.view(r, -1), (0, n_bytes * 2 - q[0].numel()), value=8).view(r, -1, 4, 32)  # [unit, s, j]
        # byte 2j of a unit: nibbles s = 0, 1 of word j; byte 2j + 1: s = 2, 3 (little-endian words)
        pairs = torch.stack([q[:, :, 0] | (q[:, :, 1] << 4), q[:, :, 2] | (q[:, :, 3] << 4)], dim=3)
        packed[start:start + _CHUNK_ROWS] = pairs.view(r, n_bytes)
        scales[start:start + _CHUNK_ROWS] = chunk_scales
    return packed, scales


def unpack_int4(packed: torch.Tensor, n_in: int) -> torch.Tensor:
    """The int8 values ``q`` in [-8, 7] of a packed int4 weight (:func:`int4_shapes`), ``[out, n_in]``."""
    pairs = packed.view(packed.shape[0], -1, 32, 2)  # [unit, j, byte]
    q = torch.stack([pairs[..., 0] & 15, pairs[..., 0] >> 4, pairs[..., 1] & 15, pairs[..., 1] >> 4], dim=2)
    return q.view(packed.shape[0], -1)[:, :n_in].to(torch.int8) - 8


def _check_head(quantization: str | None) -> str | None:
    """``lm_head`` normalised; ValueError naming it for a quantization the embedding and head cannot hold."""
    name = check_quantization(quantization, "lm_head")
    if name is not None and name not in HEAD_QUANTIZATIONS:
        raise ValueError(f"lm_head (the token embedding and LM head) must be None or one of "
                         f"{', '.join(map(repr, HEAD_QUANTIZATIONS))}, got {quantization!r}")
    return name


class _Quantized(nn.Module):
    """Shared by the quantized modules: int8/int4/bf16 ``weight`` buffer, fp32 ``scales`` (int8, int4)."""

    is_quantized = True

    def _set_weight(self, weight: torch.Tensor) -> None:
        stored, scales = quantize_weight(weight, self.quantization)
        self.register_buffer("weight", stored)
        self.register_buffer("scales", scales)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight the quantized one stands for (``q * scale``, or bf16 widened), ``[out, in]``."""
        if self.weight.is_meta:  # a skeleton's: shapes only (no Python meta kernels, see quantize_weight)
            return torch.empty(tuple(self._expected_shapes()["weight"]), device="meta")
        if self.quantization == "int4":
            n_in = self.in_features
            scales = self.scales.repeat_interleave(INT4_GROUP_SIZE, dim=1)[:, :n_in]
            return unpack_int4(self.weight, n_in).to(torch.float32) * scales
        weight = self.weight.to(torch.float32)
        return weight * self.scales[:, None] if self.scales is not None else weight

    def train(self, mode: bool = True) -> _Quantized:
        if mode:
            raise InferenceOnlyError(f"a {self.quantization}-quantized model is inference-only; load the checkpoint "
                                     f"without quantization to train it")
        return super().train(False)

    def _kernels_read(self, x: torch.Tensor) -> bool:
        return kernels.usable(x) and self.weight.device.type == "cpu" and self.weight.is_contiguous()

    # state dict: the dequantized fp32 weight under nn.Linear's / nn.Embedding's name
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - torch's signature
        destination[prefix + "weight"] = self.dequantized()
        if getattr(self, "bias", None) is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs):
        for name, shape in self._expected_shapes().items():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {shape}.")
            elif name == "weight":
                self._set_weight(value)
            else:
                self.bias = nn.Parameter(value.detach().to(torch.float32).contiguous(), requires_grad=False)


class QuantizedLinear(_Quantized):
    """An inference-only ``nn.Linear`` with int8 (per-output-channel scales) or bf16 weights.

    ``forward`` runs gpt2lab's kernel for any number of rows, each reduced in a fixed order (the same
    result alone or in a batch); without the kernels, :func:`int8_linear` (the same numbers) or, for bf16
    and off the CPU, PyTorch on the dequantized weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, quantization: str) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantization = check_quantization(quantization)
        stored, scales = quantize_weight(torch.empty(out_features, in_features, device="meta"), self.quantization)
        self.register_buffer("weight", torch.zeros(stored.shape, dtype=stored.dtype))
        self.register_buffer("scales", None if scales is None else torch.ones(scales.shape))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.training = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantization: str) -> QuantizedLinear:
        out_features, in_features = linear.weight.shape
        with torch.device("meta"):  # no throwaway allocation
            module = cls(in_features, out_features, linear.bias is not None, quantization)
        module._set_weight(linear.weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(torch.float32).contiguous(), requires_grad=False)
        return module

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias is not None:
            shapes["bias"] = (self.out_features,)
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels_read(x):
            return kernels.linear(x, self.weight, self.bias, self.scales, self.in_features)
        if self.scales is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            if self.quantization == "int4":
                return int4_linear(x, self.weight, self.scales, self.in_features, self.bias)
            return int8_linear(x, self.weight, self.scales, self.bias)
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quantization={self.quantization}")


class QuantizedEmbedding(_Quantized):
    """The token embedding with int8 (one scale per token row) or bf16 weights; as the tied LM head,
    :meth:`linear` gives the logits (the per-row scale is then a per-output-channel scale)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quantization: str) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.quantization = _check_head(quantization)
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim,
                                                   dtype=torch.int8 if quantization == "int8" else torch.bfloat16))
        self.register_buffer("scales", torch.ones(num_embeddings) if quantization == "int8" else None)
        self.training = False

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, quantization: str) -> QuantizedEmbedding:
        with torch.device("meta"):
            module = cls(embedding.num_embeddings, embedding.embedding_dim, quantization)
        module._set_weight(embedding.weight)
        return module

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.num_embeddings, self.embedding_dim)}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).to(torch.float32)  # [..., C]
        return rows * self.scales[idx][..., None] if self.scales is not None else rows

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ W.T`` (``x [..., C]`` -> ``[..., V]``)."""
        if self._kernels_read(x):
            return kernels.linear(x, self.weight, None, self.scales)
        if self.scales is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            return int8_linear(x, self.weight, self.scales)
        return F.linear(x, self.dequantized().to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, quantization={self.quantization}"


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b`` for int8 ``W = weight * scales[:, None]``, computed as gpt2lab's C kernel does, bit
    for bit: each row of ``x`` quantized to int16 (``q = round(x * 32767 / max|x|)``, ties to even, scale
    ``max|x| / 32767``; a row with NaN or infinity gives NaN outputs), the products summed exactly (in
    float64, exact for integers below 2**53: ``n_in`` up to 2**21), times ``x_scale * w_scale`` in
    float64, rounded once to fp32, plus the bias.

    ``x [..., n_in]`` fp32, ``weight [n_out, n_in]`` int8, ``scales [n_out]`` and ``bias [n_out]`` fp32, on the
    CPU; returns ``[..., n_out]`` fp32. The kernels' PyTorch twin, used where they are unavailable.
    """
    q, x_scale = _int16_rows(x)
    sums = q.double() @ weight.double().T
    y = (sums * (x_scale.double() * scales.double())).float()
    return y + bias if bias is not None else y


def _int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' int16 copy of each row of ``x`` as float (``q``, exact integers) and its scale ``[..., 1]``
    (NaN for a row holding NaN or infinity)."""
    amax = x.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(x).all(-1, keepdim=True)
    # fp32 divisions of two tensors, as the C code's (a Python number on the left would take a reciprocal)
    inv = torch.full_like(amax, 32767.0) / amax
    inv = torch.where((amax > 0) & torch.isfinite(inv), inv, torch.zeros_like(amax))  # max|x| < ~1e-34: a zero row
    q = torch.round(torch.where(finite, x, torch.zeros_like(x)) * inv)  # exactly the kernel's int16 values
    x_scale = torch.where(finite, amax / torch.full_like(amax, 32767.0), torch.full_like(amax, float("nan")))
    return q, x_scale


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b`` for packed int4 ``W`` (:func:`int4_shapes`), computed as gpt2lab's C kernel does, bit
    for bit: each row of ``x`` quantized to int16 as in :func:`int8_linear`, per group of
    :data:`INT4_GROUP_SIZE` inputs the exact integer sum of products (float64 holds it exactly), ``acc = acc +
    sum * scale`` in float64 group by group in order, then ``acc * x_scale`` rounded once to fp32, plus the bias.

    ``x [..., in_features]`` fp32, ``packed`` uint8 and ``scales [n_out, groups]`` fp32, ``bias [n_out]``, on the
    CPU; returns ``[..., n_out]`` fp32. The kernels' PyTorch twin, used where they are unavailable."""
    q, x_scale = _int16_rows(x)
    q, w = q.double(), unpack_int4(packed, in_features).double()
    acc = torch.zeros(*x.shape[:-1], packed.shape[0], dtype=torch.float64)
    for g in range(scales.shape[1]):  # in group order, as the kernel adds them
        k = slice(g * INT4_GROUP_SIZE, (g + 1) * INT4_GROUP_SIZE)
        acc = acc + (q[..., k] @ w[:, k].T) * scales[:, g].double()
    y = (acc * x_scale.double()).float()
    return y + bias if bias is not None else y


def _targets(model: GPT2) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every module quantization replaces."""
    out: list[tuple[nn.Module, str]] = [(model, "wte")]
    if model.lm_head is not None:
        out.append((model, "lm_head"))
    for block in model.h:
        out += [(block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")]
    return out


@torch.no_grad()
def quantize_(model: GPT2, quantization: str, lm_head: str | None = None) -> GPT2:
    """Quantize ``model``'s weights in place (one module at a time: the float copy of each is freed as
    soon as its quantized one exists); returns it, in eval mode and inference-only. ``model`` may be on
    the meta device (a skeleton that ``load_state_dict`` then fills, quantizing as tensors arrive).

    ``lm_head``: the token embedding's and LM head's quantization (``"int8"`` or ``"bf16"``); by default
    :data:`LM_HEAD_QUANTIZATION`'s for ``quantization``. Raises ValueError for an unknown ``quantization``
    or ``lm_head``, or a model already quantized differently."""
    quantization = check_quantization(quantization)
    head_quantization = _check_head(lm_head) if lm_head is not None else LM_HEAD_QUANTIZATION.get(quantization)
    if quantization is None:
        return model
    if model.quantization is not None:
        if model.quantization != quantization:
            raise ValueError(f"this model is already quantized to {model.quantization}; load the checkpoint again "
                             f"to quantize it to {quantization}")
        return model
    model.eval()
    for parent, name in _targets(model):
        module = getattr(parent, name)
        if isinstance(module, nn.Embedding):
            new = QuantizedEmbedding.from_embedding(module, head_quantization)
        elif parent is model:  # the untied lm_head
            new = QuantizedLinear.from_linear(module, head_quantization)
        else:
            new = QuantizedLinear.from_linear(module, quantization)
        setattr(parent, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantization = quantization
    return model


def quantized_skeleton(config: GPT2Config, quantization: str, lm_head: str | None = None) -> GPT2:
    """A quantized :class:`GPT2` of ``config`` with no weights yet (meta tensors), for
    ``load_state_dict(..., assign=True)`` to fill one tensor at a time; ``lm_head`` as :func:`quantize_`'s."""
    with meta_skeleton():
        model = GPT2(config)
    return quantize_(model, quantization, lm_head)
