"""Inference-only speedups for :class:`GPT2`, applied as a swap of modules (gpt-fast's quantisation style).

``optimize_for_inference(model)`` replaces every block's ``nn.Linear`` by a :class:`PackedLinear`
whose weight oneDNN has reordered once into its blocked GEMM layout (the ``torch.ops.mkldnn`` linear
that inductor's weight freezing uses), and stores the LM head's weight as the transpose of a
contiguous ``[n_embd, vocab]`` matrix, the layout in which ``x @ W.T`` needs no transposition
(plus a oneDNN-packed copy for multi-row batches). Measured by ``benchmarks/generate.py``.

The swap changes no name or shape in ``model.state_dict()``: a packed weight is unpacked (bit-exact)
when the state dict is taken and repacked when one is loaded, so ``save_model`` writes the original
tensors and checkpoints stay Hugging Face compatible. The optimised model cannot be trained:
``model.train()`` raises.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .gpt2 import GPT2, InferenceOnlyError


def packing_supported(weight: torch.Tensor) -> bool:
    """oneDNN packing runs on CPU fp32 weights (bf16/fp16 would need AVX512-BF16/AMX to pay off)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def check_conversion(fn) -> None:  # noqa: ANN001 - the tensor function of Module._apply
    """Refuse a ``.to()``/``.half()``/``.cuda()`` that would change a prepacked weight's device or dtype."""
    probe = fn(torch.zeros(1))
    if probe.device.type != "cpu" or probe.dtype != torch.float32:
        raise InferenceOnlyError("the prepacked weights of an inference-optimised model are CPU fp32: "
                                 "move or convert the model before optimize_for_inference, not after")


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is prepacked for oneDNN's GEMM.

    Only the packed copy is kept (no second dense copy in memory). ``state_dict()`` still yields
    ``weight [out, in]`` and ``bias`` exactly as the ``nn.Linear`` had them.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack_rows: int = 1) -> None:
        super().__init__()
        self.training = False
        self.out_features, self.in_features = weight.shape
        self.packed_numel = weight.numel()  # counted by GPT2.num_parameters (not a Parameter here)
        self.pack_rows = pack_rows  # the batch size oneDNN's blocking is tuned for (see _pack_rows)
        self._pack(weight)
        if bias is not None:
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pack_rows: int = 1) -> PackedLinear:
        return cls(linear.weight.detach(), linear.bias, pack_rows)

    def repack(self, pack_rows: int) -> None:
        """Re-block the weight for another batch size (unpacking is exact)."""
        if pack_rows != self.pack_rows:
            self.pack_rows = pack_rows
            self._pack(self.dense_weight())

    def _pack(self, weight: torch.Tensor) -> None:
        # oneDNN picks the blocking for the batch size it is told: on GPT-2 124M's block weights the
        # 1-row blocking decodes 1 row about 15% faster than the 16-row one, and 8 rows about 16% slower
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), self.pack_rows)

    def dense_weight(self) -> torch.Tensor:
        """The original ``[out, in]`` weight (unpacking is exact)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def train(self, mode: bool = True) -> PackedLinear:
        if mode:
            raise InferenceOnlyError("PackedLinear is inference-only (see optimize_for_inference)")
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - .to()/.half()/.cuda() land here
        check_conversion(fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    # state dict: present the weight as nn.Linear did
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - torch's signature
        destination[prefix + "weight"] = self.dense_weight()  # first, as in nn.Linear
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self._pack(weight.to(torch.float32))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _transposed_layout(weight: torch.Tensor) -> nn.Parameter:
    """The same ``[V, C]`` values stored as a contiguous ``[C, V]`` matrix, seen through a transpose.

    ``F.linear(x, w)`` computes ``x @ w.T``; with this layout ``w.T`` is contiguous and a one-row GEMM
    streams the weight in its natural order (1.8x faster for the LM head on AVX2 CPUs). Embedding
    lookups (row gathers) still work on the transposed view.
    """
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)


class PackedLMHead(nn.Module):
    """The LM head for inference: ``x @ W[C, V]`` for one row, a oneDNN-packed copy for several.

    One row (batch-1 decoding) is fastest straight from the ``[C, V]`` layout; for several rows
    (batched decoding, prefill logits) oneDNN's packed GEMM is faster, at the price of a second copy
    of the head's weight (``vocab * n_embd`` floats), made on the first multi-row call: a process that
    only ever decodes one row never pays its memory or packing time. Owns no parameter: ``weight`` is
    the model's own (the tied embedding), so nothing is added to ``state_dict()``.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.training = False
        self.weight_t = weight.detach().t()  # [C, V], contiguous, shares the parameter's storage
        self.packed: torch.Tensor | None = None

    def repack(self) -> None:
        """Drop the packed copy (the weight changed: the model loaded a state dict); the next
        multi-row call packs it again."""
        self.packed = None

    def ensure_packed(self) -> torch.Tensor:
        """The multi-row copy, packed now if it is not yet."""
        if self.packed is None:
            # blocking tuned for several rows: 10-25% faster than the 1-row blocking at 2-16 rows
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight_t.t().contiguous(), _MULTI_ROWS)
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return x @ self.weight_t
        return torch.ops.mkldnn._linear_pointwise(x, self.ensure_packed(), None, "none", [], "")

    def train(self, mode: bool = True) -> PackedLMHead:
        if mode:
            raise InferenceOnlyError("PackedLMHead is inference-only (see optimize_for_inference)")
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        check_conversion(fn)
        return super()._apply(fn, recurse)


def _repack_head(model: GPT2, incompatible_keys) -> None:  # noqa: ANN001 - load_state_dict post-hook
    if isinstance(model.fast_head, PackedLMHead):
        model.fast_head.repack()


_MULTI_ROWS = 16  # the blocking oneDNN picks for 16 rows is the best measured at 2-16 rows


def _pack_rows(batch_size: int) -> int:
    """The batch size to tune oneDNN's blocking for: 1 for one row, else _MULTI_ROWS."""
    return 1 if batch_size <= 1 else _MULTI_ROWS


@torch.no_grad()
def optimize_for_inference(model: GPT2, batch_size: int = 1) -> GPT2:
    """Make ``model`` fast for CPU inference, in place; returns it. The result cannot train.

    ``batch_size``: the number of sequences usually decoded together (1 for a single prompt, the
    engine's ``max_batch`` for a server); the weights are blocked for it. Calling again with another
    batch size re-blocks them; otherwise it is a no-op.
    Logits stay within 1e-4 of the unoptimised model; the KV-cached paths are unchanged.
    Weights that oneDNN cannot pack (GPU, fp16/bf16) keep their ``nn.Linear``.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"optimize_for_inference expects a gpt2lab GPT2 model, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if model.inference_only:
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.repack(_pack_rows(batch_size))
        _prepare_head(model, batch_size)
        return model
    model.eval()
    for block in model.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            linear = getattr(parent, name)
            if isinstance(linear, nn.Linear) and packing_supported(linear.weight):
                setattr(parent, name, PackedLinear.from_linear(linear, _pack_rows(batch_size)))
    head = model.wte if model.lm_head is None else model.lm_head
    head.weight = _transposed_layout(head.weight)
    if packing_supported(head.weight):
        model.fast_head = PackedLMHead(head.weight)
        model.register_load_state_dict_post_hook(_repack_head)
    for p in model.parameters():
        p.requires_grad_(False)
    model.inference_only = True
    _prepare_head(model, batch_size)
    return model


def _prepare_head(model: GPT2, batch_size: int) -> None:
    """Pack the LM head's multi-row copy now when batches are expected (not in the first request)."""
    if batch_size > 1 and isinstance(model.fast_head, PackedLMHead):
        model.fast_head.ensure_packed()
