"""Inference-only speedups for :class:`GPT2`, applied as a swap of modules (gpt-fast's quantisation style).

``optimize_for_inference(model)`` installs, where gpt2lab's own CPU kernels build (``kernels.py``,
any machine with a C compiler):

- a :class:`KernelLinear` for every block projection: decode steps of up to 16 rows run through the
  kernels, which stream the dense weight at memory bandwidth; prefills go through oneDNN;
- a :class:`Decoder` (``model.decoder``): a whole decode step of up to 16 rows, embedding to logits,
  in one C call.

Without the kernels, every projection becomes a :class:`PackedLinear`, whose weight oneDNN has
reordered once into its blocked GEMM layout (the ``torch.ops.mkldnn`` linear that inductor's weight
freezing uses), blocked for the ``batch_size`` it is told, and the LM head's weight is stored as a
contiguous ``[n_embd, vocab]`` matrix, the layout in which ``x @ W.T`` needs no transposition.
The LM head (:class:`PackedLMHead`) reads the tied embedding and keeps a oneDNN-packed copy for the
many-row products that the kernels leave alone. Measured by ``benchmarks/generate.py``.

The swap changes no name or shape in ``model.state_dict()``: a packed weight is unpacked (bit-exact)
when the state dict is taken and repacked when one is loaded, so ``save_model`` writes the original
tensors and checkpoints stay Hugging Face compatible. The optimised model cannot be trained:
``model.train()`` raises.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
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


class KernelLinear(nn.Linear):
    """An inference ``nn.Linear`` for decoding: up to ``kernels.MAX_ROWS`` rows go through gpt2lab's
    own kernel (``kernels.linear``), which streams the dense ``[out, in]`` weight at memory bandwidth
    for one row and reuses each weight load for two rows when there are several; more rows (a
    prefill) go through oneDNN. The weight stays an ordinary parameter, so the state dict, loading and
    saving are nn.Linear's own.
    """

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> KernelLinear:
        out_features, in_features = weight.shape
        linear = cls(in_features, out_features, bias=bias is not None, device="meta")  # no init work
        linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return linear.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= kernels.MAX_ROWS * self.in_features and kernels.usable(x):
            return kernels.linear(x, self.weight, self.bias)
        if packing_supported(self.weight) and not x.requires_grad:
            # oneDNN on the unpacked weight: 1.6x faster than F.linear's MKL path at 16 rows
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def train(self, mode: bool = True) -> KernelLinear:
        if mode:
            raise InferenceOnlyError("KernelLinear is inference-only (see optimize_for_inference)")
        return super().train(False)


_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the activation gpt2lab_decode computes


def _block_linears(block: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")]


class Decoder:
    """A decode step of up to ``kernels.MAX_ROWS`` rows (one token each, logits out) as a single call
    of the C kernel ``gpt2lab_decode``, the same arithmetic as :meth:`GPT2.forward` with the KV cache.
    Installed as ``model.decoder`` by ``optimize_for_inference``.

    Once the weights stream at memory bandwidth, the ~20 tensor ops per layer of a decode step cost
    10-15% of it; the kernel keeps one team of threads busy from the embedding to the logits. It
    holds the addresses of the model's weights (taken again when a state dict is loaded) and of the
    KV cache (taken again whenever ``setup_cache`` allocates a new one).
    """

    def __init__(self, model: GPT2) -> None:
        cfg = model.config
        self.config, self.model = cfg, model
        self.layers = (kernels.Layer * cfg.n_layer)()
        rows = kernels.MAX_ROWS
        self.x, self.h = torch.empty(rows, cfg.n_embd), torch.empty(rows, cfg.n_embd)
        self.big = torch.empty(rows, max(3 * cfg.n_embd, cfg.mlp_dim))
        self.bind_weights()

    @staticmethod
    def supports(model: GPT2) -> bool:
        linears = [getattr(parent, name) for block in model.h for parent, name in _block_linears(block)]
        weights = [model.wte.weight, model.wpe.weight, model.lm_head_weight]
        return (model.config.activation_function in _TANH_GELUS and kernels.available()
                and all(isinstance(m, KernelLinear) and m.bias is not None for m in linears)
                and all(packing_supported(w) and w.is_contiguous() for w in weights))

    def handles(self, idx: torch.Tensor) -> bool:
        """Whether this step is the decoder's: one token per row, at most ``kernels.MAX_ROWS`` rows."""
        return idx.shape[1] == 1 and idx.shape[0] <= kernels.MAX_ROWS and idx.device.type == "cpu"

    def bind_weights(self) -> None:
        """Take the weights' addresses (again after load_state_dict, which may assign new tensors)."""
        model = self.model
        self.tensors = [model.wte.weight, model.wpe.weight, model.ln_f.weight, model.ln_f.bias, model.lm_head_weight]
        for layer, block in zip(self.layers, model.h):
            parts = dict(ln_1=block.ln_1, attn=block.attn.c_attn, attn_proj=block.attn.c_proj, ln_2=block.ln_2,
                         fc=block.mlp.c_fc, mlp_proj=block.mlp.c_proj)
            for prefix, module in parts.items():
                for suffix, tensor in (("w", module.weight), ("b", module.bias)):
                    setattr(layer, f"{prefix}_{suffix}", tensor.data_ptr())
                    self.tensors.append(tensor)  # keeps every bound address valid
            layer.attn_scale = block.attn.scale
        self.caches: list | None = None

    def _bind_cache(self, caches: list) -> None:
        if self.caches != caches:  # setup_cache made new ones
            for layer, cache in zip(self.layers, caches):
                layer.k_cache, layer.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            self.caches = caches

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, first_row: int) -> torch.Tensor:
        """Logits ``[B, V]`` for tokens ``idx [B, 1]`` at positions ``input_pos [B, 1]``, in cache rows
        ``first_row .. first_row + B - 1``."""
        cfg, model = self.config, self.model
        n_rows = idx.shape[0]
        tokens = idx.reshape(n_rows).to(torch.int64).contiguous()
        positions = input_pos.reshape(n_rows).to(torch.int64).contiguous()
        # the C code indexes memory with these: check them as torch's own ops would
        low, high = torch.aminmax(tokens)
        if low < 0 or high >= cfg.vocab_size:
            raise IndexError(f"token ids must be in [0, {cfg.vocab_size}), got {tokens.tolist()}")
        caches = model.caches()
        if caches[0] is None:
            raise RuntimeError("call model.setup_cache() before cached inference")
        low, high = torch.aminmax(positions)
        if low < 0 or high >= model.max_seq or not 0 <= first_row <= model.max_batch - n_rows:
            raise ValueError(f"positions {positions.tolist()} of rows {first_row}..{first_row + n_rows - 1} are beyond "
                             f"the KV cache ({model.max_batch} rows of {model.max_seq} slots)")
        self._bind_cache(caches)
        logits = torch.empty(n_rows, cfg.vocab_size)
        w = self.tensors
        kernels.library().gpt2lab_decode(
            self.layers, cfg.n_layer, w[0].data_ptr(), w[1].data_ptr(), w[2].data_ptr(), w[3].data_ptr(),
            w[4].data_ptr(), tokens.data_ptr(), positions.data_ptr(), n_rows, first_row, cfg.n_embd, cfg.n_head,
            cfg.mlp_dim, cfg.vocab_size, model.max_seq, cfg.layer_norm_epsilon, self.x.data_ptr(), self.h.data_ptr(),
            self.big.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits


def _transposed_layout(weight: torch.Tensor) -> nn.Parameter:
    """The same ``[V, C]`` values stored as a contiguous ``[C, V]`` matrix, seen through a transpose.

    ``F.linear(x, w)`` computes ``x @ w.T``; with this layout ``w.T`` is contiguous and a one-row GEMM
    streams the weight in its natural order (1.8x faster for the LM head on AVX2 CPUs). Embedding
    lookups (row gathers) still work on the transposed view.
    """
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)


class PackedLMHead(nn.Module):
    """The LM head for inference. Up to ``kernels.MAX_ROWS`` rows go through gpt2lab's kernels, which
    read the weight in its own ``[V, C]`` layout; without the kernels, one row runs ``x @ W[C, V]`` on
    the transposed layout that ``optimize_for_inference`` then stores.

    More rows (full-sequence logits), or several rows without the kernels, use oneDNN's packed GEMM,
    at the price of a second copy of the head's weight (``vocab * n_embd`` floats), made on the first
    such call: a process that never needs it never pays its memory or packing time. Owns no
    parameter: ``weight`` is the model's own (the tied embedding), so nothing is added to
    ``state_dict()``.
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
        rows = x.numel() // x.shape[-1]
        weight = self.weight_t.t()
        if rows <= kernels.MAX_ROWS and weight.is_contiguous() and kernels.usable(x):  # the [V, C] layout
            return kernels.linear(x, weight, None)
        if rows == 1:
            return x @ self.weight_t
        return torch.ops.mkldnn._linear_pointwise(x, self.ensure_packed(), None, "none", [], "")

    def train(self, mode: bool = True) -> PackedLMHead:
        if mode:
            raise InferenceOnlyError("PackedLMHead is inference-only (see optimize_for_inference)")
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        check_conversion(fn)
        return super()._apply(fn, recurse)


def _after_load_state_dict(model: GPT2, incompatible_keys) -> None:  # noqa: ANN001 - post-hook signature
    if isinstance(model.fast_head, PackedLMHead):
        model.fast_head.repack()
    if model.decoder is not None:
        model.decoder.bind_weights()


_MULTI_ROWS = 16  # the blocking oneDNN picks for 16 rows is the best measured at 2-16 rows


def _pack_rows(batch_size: int) -> int:
    """The batch size to tune oneDNN's blocking for: 1 for one row, else _MULTI_ROWS."""
    return 1 if batch_size <= 1 else _MULTI_ROWS


@torch.no_grad()
def optimize_for_inference(model: GPT2, batch_size: int = 1) -> GPT2:
    """Make ``model`` fast for CPU inference, in place; returns it. The result cannot train.

    ``batch_size``: the number of sequences usually decoded together (1 for a single prompt, the
    engine's ``max_batch`` for a server). Only the fallback without gpt2lab's kernels uses it: its
    oneDNN weights are blocked for it, and re-blocked when called again with another batch size.
    Otherwise a repeat call is a no-op. Logits stay within 1e-4 of the unoptimised model.
    Weights that neither can run (GPU, fp16/bf16) keep their ``nn.Linear``.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"optimize_for_inference expects a gpt2lab GPT2 model, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if model.wte.weight.device.type == "cuda":  # the GPU's own path: CUDA graphs (model/cuda_graphs.py)
        from .cuda_graphs import prepare_for_inference

        return prepare_for_inference(model)
    if model.inference_only:
        _swap_block_linears(model, batch_size)
        _install_fast_paths(model, batch_size)
        return model
    model.eval()
    _swap_block_linears(model, batch_size)
    head = model.wte if model.lm_head is None else model.lm_head
    if not (kernels.available() and packing_supported(head.weight)):  # the kernels read [V, C] as it is
        head.weight = _transposed_layout(head.weight)
    if packing_supported(head.weight):
        model.fast_head = PackedLMHead(head.weight)
    model.register_load_state_dict_post_hook(_after_load_state_dict)
    for p in model.parameters():
        p.requires_grad_(False)
    model.inference_only = True
    _install_fast_paths(model, batch_size)
    return model


def _swap_block_linears(model: GPT2, batch_size: int) -> None:
    """Give every block projection its inference form: a KernelLinear where gpt2lab's kernels build
    (at any batch size), else a PackedLinear blocked for ``batch_size`` (re-blocked on a repeat call)."""
    for block in model.h:
        for parent, name in _block_linears(block):
            linear = getattr(parent, name)
            if isinstance(linear, PackedLinear):
                linear.repack(_pack_rows(batch_size))
            elif not isinstance(linear, KernelLinear) and packing_supported(linear.weight):
                fast = (KernelLinear.from_weight(linear.weight, linear.bias) if kernels.available()
                        else PackedLinear.from_linear(linear, _pack_rows(batch_size)))
                setattr(parent, name, fast)


def _install_fast_paths(model: GPT2, batch_size: int) -> None:
    """The one-call decode step where the kernels run; without them, when batches are expected, the
    LM head's multi-row copy packed now (not in the first request)."""
    model.decoder = Decoder(model) if Decoder.supports(model) else None
    if batch_size > 1 and model.decoder is None and isinstance(model.fast_head, PackedLMHead):
        model.fast_head.ensure_packed()
