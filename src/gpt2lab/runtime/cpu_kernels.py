"""A cached forward of a :class:`~gpt2lab.model.GPT2` as one call of gpt2lab's C kernel ``gpt2lab_forward``.

:class:`KernelRunner` runs every cached forward of a model, prefill and decode alike: embedding, per layer
LayerNorm, QKV product, KV-cache write, attention, output projection, LayerNorm, MLP, and the LM head for
the positions that need logits. :meth:`KernelRunner.supports` says which models it can run (CPU weights
it reads: fp32, or int8/int4/bf16 after :mod:`gpt2lab.model.quantize`; the plain modules, no forward hooks).
:class:`WeightsWatch` tells, in tens of microseconds, whether the tensors a runner points to are still the
model's. Whether a forward runs here at all is decided in :mod:`gpt2lab.runtime`, which keeps the runner
and its watch (outside the model).

The kernels read the model's own parameters in place (no packed or transposed copy), so the same
model trains: an optimizer step writes the tensors the kernels read, and a runner is rebuilt whenever
a parameter is replaced (``load_state_dict(assign=True)``, ``.to()``, a swapped module).

Batch invariance: the kernels compute every token's row with the same arithmetic, in the same order,
whatever the other rows of the batch are (see ``kernels.c``), and attention per token over its own
cache row. A seeded request gives the same tokens alone or batched, in prefill and in decode.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .. import kernels
from ..model import GPT2, KVCache, QuantizedEmbedding, QuantizedLinear
from ..model.quantize import int4_shapes
from .threads import ThreadTuner

if TYPE_CHECKING:
    from ..model.multi_lora import LoRAMapping

_KERNEL_MODULES = (nn.Linear, nn.Embedding, QuantizedLinear, QuantizedEmbedding)


def _block_linears(block: nn.Module) -> list[nn.Module]:
    return [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]


def _matrix(module: nn.Module) -> tuple[kernels.Matrix, list[torch.Tensor]]:
    """The kernel's view of a linear (or embedding used as the LM head) and the tensors it points to."""
    weight = module.weight
    scales = getattr(module, "scales", None)
    bias = getattr(module, "bias", None)
    tensors = [t for t in (weight, scales, bias) if t is not None]
    return kernels.matrix(weight, bias, scales), tensors


def _readable(t: torch.Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.is_contiguous() and t.dtype in kernels.WEIGHT_DTYPES)


def _expected_shapes(model: GPT2) -> list[tuple[torch.Tensor | None, tuple[int, ...]]]:
    """Every tensor the C code reads, with the shape the config implies (it indexes memory by these)."""
    cfg = model.config
    C, V, F = cfg.n_embd, cfg.vocab_size, cfg.mlp_dim
    head = model.wte if model.lm_head is None else model.lm_head
    pairs: list[tuple[torch.Tensor | None, tuple[int, ...]]] = [
        (model.wte.weight, (V, C)), (head.weight, (V, C)), (model.wpe.weight, (cfg.n_positions, C)),
        (model.ln_f.weight, (C,)), (model.ln_f.bias, (C,))]
    pairs += [(getattr(m, "scales", None), (V,)) for m in (model.wte, head) if getattr(m, "scales", None) is not None]
    for block in model.h:
        pairs += [(block.ln_1.weight, (C,)), (block.ln_1.bias, (C,)), (block.ln_2.weight, (C,)),
                  (block.ln_2.bias, (C,))]
        for module, (out, inp) in zip(_block_linears(block), ((3 * C, C), (C, C), (F, C), (C, F))):
            packed = module.weight.dtype == torch.uint8  # int4: packed bytes, a scale per group (int4_shapes)
            weight_shape, scales_shape = int4_shapes(out, inp) if packed else ((out, inp), (out,))
            pairs += [(module.weight, weight_shape), (getattr(module, "bias", None), (out,))]
            if getattr(module, "scales", None) is not None:
                pairs.append((module.scales, scales_shape))
    return pairs


def _shapes_match(model: GPT2) -> bool:
    """Whether every tensor has its config's shape: a replaced tensor of another shape must make the
    PyTorch code run (and raise its clear error), never let the kernels read past its end."""
    return len(model.h) == model.config.n_layer and all(
        t is not None and tuple(t.shape) == shape for t, shape in _expected_shapes(model))


class KernelRunner:
    """A cached forward of any tokens (a prefill, a decode step, ragged rows) as a single call of the C
    kernel ``gpt2lab_forward``, the same arithmetic as :meth:`GPT2.forward` with the KV cache.
    Made by :func:`gpt2lab.runtime.inference_runner`, which drops it when the model's tensors change
    (:class:`WeightsWatch`); holds the addresses of the model's weights and of the KV cache (taken again
    whenever ``setup_cache`` allocates a new one), and only a weak reference to the model itself (the
    runtime keeps runners in a dictionary keyed weakly by their model: a strong one would keep every model
    alive).
    """

    def __init__(self, model: GPT2) -> None:
        cfg = model.config
        self.config, self._model = cfg, weakref.ref(model)
        self.layers = (kernels.Layer * cfg.n_layer)()
        self.tensors: list[torch.Tensor] = []  # keeps every bound address valid
        self.wte, held = _matrix(model.wte)
        self.tensors += held
        head = model.wte if model.lm_head is None else model.lm_head
        self.head, held = _matrix(head)
        self.head.bias = None  # the LM head has none (an embedding has no bias attribute anyway)
        self.tensors += held + [model.wpe.weight, model.ln_f.weight, model.ln_f.bias]
        for layer, block in zip(self.layers, model.h):
            layer.ln_1_w, layer.ln_1_b = block.ln_1.weight.data_ptr(), block.ln_1.bias.data_ptr()
            layer.ln_2_w, layer.ln_2_b = block.ln_2.weight.data_ptr(), block.ln_2.bias.data_ptr()
            self.tensors += [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
            for name, module in zip(("attn", "attn_proj", "fc", "mlp_proj"), _block_linears(block)):
                matrix, held = _matrix(module)
                setattr(layer, name, matrix)
                self.tensors += held
            layer.attn_scale = block.attn.scale
        self.caches: list | None = None
        self.quantized = any(t.dtype in (torch.int8, torch.uint8) for t in self.tensors)  # int16 rows needed
        self.wte_ref, self.head_ref = ctypes.byref(self.wte), ctypes.byref(self.head)
        self.wpe, self.ln_f_w, self.ln_f_b = (t.data_ptr() for t in (model.wpe.weight, model.ln_f.weight,
                                                                      model.ln_f.bias))
        self._last_plan: _Plan | None = None
        self._lora_pairs: tuple | None = None  # (bank, its version, the C array of its pairs)
        self.threads = ThreadTuner()  # the thread count of each forward (auto, or pinned by --threads)

    @staticmethod
    def supports(model: GPT2) -> bool:
        """Whether the kernels can run this model: CPU weights they read (fp32, int8 or int4 with scales,
        bf16; int4 in the blocks only), fp32 LayerNorms and embeddings of positions, biases on every block linear."""
        linears = [m for block in model.h for m in _block_linears(block)]
        head = model.wte if model.lm_head is None else model.lm_head
        # the kernels compute what these modules' own forward does; any other module in their place (a
        # LoRA wrapper, a user's subclass) has its own forward, which only the PyTorch code runs
        if not all(type(m) in _KERNEL_MODULES for m in [*linears, model.wte, head]):
            return False
        # likewise a forward hook on a submodule (activation capture, steering) must run: the kernels call none
        if any(_global_hooks()) or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()
                                       if m is not model):
            return False
        weights = [m.weight for m in [*linears, model.wte, head]]
        floats = [model.wpe.weight, model.ln_f.weight, model.ln_f.bias]
        for block in model.h:
            floats += [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
        floats += [m.bias for m in linears]
        floats += [t for m in [*linears, model.wte, head] if (t := getattr(m, "scales", None)) is not None]
        return (model.config.activation_function in kernels.ACTIVATIONS and kernels.available()
                and _shapes_match(model)
                and all(getattr(m, "bias", None) is not None for m in linears)
                and all(m.weight.dtype != torch.uint8 for m in (model.wte, head))  # packed int4: blocks only
                and all(_readable(w) for w in weights)
                and all(w.dtype not in (torch.int8, torch.uint8) or getattr(m, "scales", None) is not None
                        for m, w in zip([*linears, model.wte, head], weights))
                and all(_readable(t) and t.dtype == torch.float32 for t in floats))

    def _bind_cache(self, caches: list) -> None:
        if self.caches != caches:  # setup_cache made new ones
            for layer, cache in zip(self.layers, caches):
                layer.k_cache, layer.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            self.caches = caches

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, rows: slice | None,
                 logits_index: torch.Tensor | None, lora: LoRAMapping | None = None) -> torch.Tensor:
        """Logits for tokens ``idx [B, T]`` at positions ``input_pos [B, T]`` of cache rows ``rows``
        (default ``0..B-1``): ``[B, V]`` at ``logits_index [B]`` when given, else ``[B, T, V]``; ``lora``:
        each row's LoRA adapter (its low-rank products added right after the base ones, in the same call).
        Arguments and errors as :meth:`GPT2.forward`'s."""
        cfg, model = self.config, self._model()
        if model is None:
            raise ReferenceError("this KernelRunner's model no longer exists")
        B, T = idx.shape
        first_row = (rows.start or 0) if rows is not None else 0
        tokens = idx.reshape(-1).to(torch.int64).contiguous()
        positions = input_pos.expand(B, T).reshape(-1).to(torch.int64).contiguous()
        caches = model.caches() if model.max_batch else [None]
        if caches[0] is None:
            raise RuntimeError("call model.setup_cache() before cached inference")
        if not 0 <= first_row <= model.max_batch - B:
            raise ValueError(f"rows {first_row}..{first_row + B - 1} are beyond the KV cache ({model.max_batch} rows)")
        self._bind_cache(caches)
        if logits_index is not None:
            index = logits_index.to(torch.int64).reshape(B)
            if int(index.min()) < 0 or int(index.max()) >= T:
                raise IndexError(f"logits_index must be in [0, {T}), got {index.tolist()}")
        plan = self._plan(B, T, first_row, logits_index is None, model.max_seq)
        logit_tokens = plan.logit_tokens if logits_index is None else plan.row_starts + index
        logits = torch.empty(plan.n_logits, cfg.vocab_size)
        table = self._lora_table(lora, T) if lora is not None else None
        threads, timing = self.threads.choose(B * T, T > 1)
        start = ThreadTuner.clock()
        status = kernels.library().gpt2lab_forward(
            self.layers, cfg.n_layer, self.wte_ref, self.wpe, self.ln_f_w, self.ln_f_b, self.head_ref,
            tokens.data_ptr(), positions.data_ptr(), plan.cache_rows.data_ptr(), B * T, logit_tokens.data_ptr(),
            plan.n_logits, cfg.n_embd, cfg.n_head, cfg.mlp_dim, cfg.vocab_size, model.max_seq, cfg.layer_norm_epsilon,
            kernels.ACTIVATIONS[cfg.activation_function], *plan.scratch, logits.data_ptr(), threads,
            ctypes.byref(table[0]) if table is not None else None)
        self.threads.record(timing, threads, ThreadTuner.clock() - start)
        if status:  # the C code checked what it indexes memory with, before any work
            if status == 1:
                raise IndexError(f"token ids must be in [0, {cfg.vocab_size}), got {tokens.tolist()[:32]}")
            low, high = torch.aminmax(positions)
            raise ValueError(f"positions {int(low)}..{int(high)} of rows {first_row}..{first_row + B - 1} are beyond "
                             f"the KV cache ({model.max_batch} rows of {model.max_seq} slots)")
        return logits if logits_index is not None else logits.view(B, T, cfg.vocab_size)

    def _lora_table(self, lora: LoRAMapping, T: int) -> tuple[kernels.LoRATable, list[torch.Tensor]]:
        """The C table of ``lora``'s adapters (the pairs kept while the bank does not change) and the
        tensors it points into."""
        bank = lora.bank
        if self._lora_pairs is None or self._lora_pairs[0]() is not bank or self._lora_pairs[1] != bank.version:
            n_layer = self.config.n_layer
            pairs = (kernels.LoRAPair * max(1, len(bank.slots) * n_layer * 4))()
            for s, slot in enumerate(bank.slots):
                for layer, per_layer in enumerate(slot.pairs if slot is not None else []):
                    for j, pair in enumerate(per_layer):
                        if pair is not None:
                            a, bt = pair
                            pairs[(s * n_layer + layer) * 4 + j] = kernels.LoRAPair(a.data_ptr(), bt.data_ptr(),
                                                                                   slot.rank, slot.scale)
            # the slots keep their tensors alive; a bank change (a load or a freed slot) rebuilds the table
            self._lora_pairs = (weakref.ref(bank), bank.version, pairs)  # weakly: the bank holds the model
        token_slot = lora.row_slots.to(torch.int64).repeat_interleave(T).contiguous()
        tmp = torch.empty(token_slot.numel() * max(1, bank.max_rank))
        pairs = ctypes.cast(self._lora_pairs[2], ctypes.POINTER(kernels.LoRAPair))
        table = kernels.LoRATable(token_slot.data_ptr(), pairs, tmp.data_ptr(),
                                  max(1, bank.max_rank))
        return table, [token_slot, tmp]

    def _plan(self, B: int, T: int, first_row: int, all_logits: bool, max_seq: int) -> _Plan:
        """The index tensors and scratch buffers of a forward of this shape: kept from the last forward of
        the same shape (a decode step repeats one shape; making them again cost more than the C code's
        own overhead)."""
        key = (B, T, first_row, all_logits, max_seq, ThreadTuner.most())  # scratch for up to that many threads
        if self._last_plan is None or self._last_plan.key != key:
            self._last_plan = _Plan(key, self.config, self.quantized)
        return self._last_plan


class _Plan:
    """What a forward of ``B`` rows of ``T`` tokens from cache row ``first_row`` needs besides its inputs."""

    def __init__(self, key: tuple, cfg, quantized: bool) -> None:  # noqa: ANN001 - a GPT2Config
        B, T, first_row, all_logits, max_seq, threads = key
        self.key, self.threads = key, threads
        n_tok, C = B * T, cfg.n_embd
        self.cache_rows = torch.arange(first_row, first_row + B, dtype=torch.int64).repeat_interleave(T)
        self.row_starts = torch.arange(B, dtype=torch.int64) * T
        self.logit_tokens = torch.arange(n_tok, dtype=torch.int64)
        self.n_logits = n_tok if all_logits else B
        # x, h, the QKV / MLP-wide rows, ln_f's output at the logit positions, attention scores per thread,
        # and the int16 copies of an int8 product's inputs with their scales (left tiny without int8 weights)
        self._buffers = [torch.empty(n_tok, C), torch.empty(n_tok, C), torch.empty(n_tok, max(3 * C, cfg.mlp_dim)),
                         torch.empty(self.n_logits, C), torch.empty(threads, max_seq),
                         torch.empty(n_tok, max(C, cfg.mlp_dim) if quantized else 1, dtype=torch.int16),
                         torch.empty(n_tok)]
        self.scratch = [t.data_ptr() for t in self._buffers]


def _global_hooks() -> tuple[dict, dict]:
    """torch's forward hooks on every module (``register_module_forward_hook``, ``..._pre_hook``)."""
    from torch.nn.modules import module

    return module._global_forward_hooks, module._global_forward_pre_hooks


class WeightsWatch:
    """Whether the tensors a runner reads are still the model's, checked in tens of microseconds (it runs
    before every forward; walking ``model.parameters()`` took about 2 ms, a quarter of an int8 decode step).

    It remembers every module's parameter, buffer and submodule tables with their entries and sizes, and
    every tensor's address. A replaced parameter or submodule (``load_state_dict(assign=True)``,
    ``model.wte = ...``), an added one, or a tensor whose storage moved (``.to()``, ``param.data = ...``)
    makes it stale; writes into the tensors (an optimizer step, a copying ``load_state_dict``) do not,
    since the kernels read them in place. KV caches are left out: ``setup_cache`` replaces them freely.
    """

    def __init__(self, model: GPT2) -> None:
        tables, keys, values, tensors = [], [], [], []
        for module in model.modules():
            if isinstance(module, KVCache):
                continue
            # and the forward hooks: a hook added later must send the forward to the modules' own code
            for table in (module._parameters, module._buffers, module._modules, module._forward_hooks,
                          module._forward_pre_hooks):
                tables.append(table)
                for name, value in table.items():
                    if name != "kv_cache":
                        keys.append((table, name))
                        values.append(value)
                        if isinstance(value, torch.Tensor):
                            tensors.append(value)
        tables += _global_hooks()
        self.tables, self.sizes = tables, [len(table) for table in tables]
        self.keys, self.values = keys, values
        self.tensors, self.addresses = tensors, [t.data_ptr() for t in tensors]

    def fresh(self) -> bool:
        """Whether every table, entry and tensor address is as it was when the watch was made."""
        # map() and list equality run in C: about 60-75 us for GPT-2 124M (800 entries and the hook tables)
        return ([len(table) for table in self.tables] == self.sizes
                and all(map(operator.is_, [table.get(name) for table, name in self.keys], self.values))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.addresses)
