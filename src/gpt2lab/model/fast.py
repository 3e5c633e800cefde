"""How a :class:`GPT2` runs its cached forward: the one place that decides (:func:`inference_runner`).

A model in eval mode, outside autograd, whose weights gpt2lab's C kernels can read (CPU; fp32, or
int8/bf16 after :mod:`.quantize`), runs every cached forward, prefill and decode alike, as one call
of the kernel ``gpt2lab_forward`` (:class:`KernelRunner`): embedding, per layer LayerNorm, QKV
product, KV-cache write, attention, output projection, LayerNorm, MLP, and the LM head
for the positions that need logits. Nothing has to be switched on: ``gpt2lab.load()`` followed by
``generate``/``stream`` runs this way.

The kernels read the model's own parameters in place (no packed or transposed copy), so the same
model trains: in training mode or when autograd needs gradients the runner is not used, an
optimizer step writes the tensors the kernels read, and a runner is rebuilt whenever a parameter is
replaced (``load_state_dict(assign=True)``, ``.to()``, a swapped module), found by a cheap check of the
identity and address of every tensor it reads before each forward (once per block inside
:func:`unchanged_weights`, which loops that own the model hold).

Batch invariance: the kernels compute every token's row with the same arithmetic, in the same order,
whatever the other rows of the batch are (see ``kernels.c``), and attention per token over its own
cache row. A seeded request gives the same tokens alone or batched, in prefill and in decode.

Everything else (a forward without the KV cache, e.g. scoring; models the kernels cannot run: GPU,
fp16, other activations) runs :class:`GPT2`'s plain PyTorch code. A CUDA path would sit beside the
kernel one in :func:`inference_runner`.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import kernels
from .gpt2 import GPT2, KVCache
from .quantize import QuantizedEmbedding, QuantizedLinear

if TYPE_CHECKING:
    from .multi_lora import LoRAMapping

_KERNEL_MODULES = (nn.Linear, nn.Embedding, QuantizedLinear, QuantizedEmbedding)


def _block_linears(block: nn.Module) -> list[nn.Module]:
    return [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]


def _matrix(module: nn.Module) -> tuple[kernels.Matrix, list[torch.Tensor]]:
    """The kernel's view of a linear (or embedding used as the LM head) and the tensors it points to."""
    weight = module.weight
    scales = getattr(module, "scales", None)
    bias = getattr(module, "bias", None)
    tensors = [t for t in (weight, scales, bias) if t is not None]
    return kernels.Matrix.of(weight, bias, scales), tensors


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
            pairs += [(module.weight, (out, inp)), (getattr(module, "bias", None), (out,))]
            if getattr(module, "scales", None) is not None:
                pairs.append((module.scales, (out,)))
    return pairs


def _shapes_match(model: GPT2) -> bool:
    """Whether every tensor has its config's shape: a replaced tensor of another shape must make the
    PyTorch code run (and raise its clear error), never let the kernels read past its end."""
    return len(model.h) == model.config.n_layer and all(
        t is not None and tuple(t.shape) == shape for t, shape in _expected_shapes(model))


class KernelRunner:
    """A cached forward of any tokens (a prefill, a decode step, ragged rows) as a single call of the C
    kernel ``gpt2lab_forward``, the same arithmetic as :meth:`GPT2.forward` with the KV cache.
    Made by :func:`inference_runner`, which drops it when the model's tensors change (:class:`_WeightsWatch`);
    holds the addresses of the model's weights and of the KV cache (taken again whenever ``setup_cache``
    allocates a new one).
    """

    def __init__(self, model: GPT2) -> None:
        cfg = model.config
        self.config, self.model = cfg, model
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
        self.quantized = any(t.dtype == torch.int8 for t in self.tensors)
        self.wte_ref, self.head_ref = ctypes.byref(self.wte), ctypes.byref(self.head)
        self.wpe, self.ln_f_w, self.ln_f_b = (t.data_ptr() for t in (model.wpe.weight, model.ln_f.weight,
                                                                      model.ln_f.bias))
        self._last_plan: _Plan | None = None
        self._lora_pairs: tuple | None = None  # (bank, its version, the C array of its pairs)

    @staticmethod
    def supports(model: GPT2) -> bool:
        """Whether the kernels can run this model: CPU weights they read (fp32, int8 with scales,
        bf16), fp32 LayerNorms and embeddings of positions, biases on every block linear."""
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
                and all(_readable(w) for w in weights)
                and all(w.dtype != torch.int8 or getattr(m, "scales", None) is not None
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
        cfg, model = self.config, self.model
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
        plan = self._plan(B, T, first_row, logits_index is None)
        logit_tokens = plan.logit_tokens if logits_index is None else plan.row_starts + index
        logits = torch.empty(plan.n_logits, cfg.vocab_size)
        table = self._lora_table(lora, T) if lora is not None else None
        status = kernels.library().gpt2lab_forward(
            self.layers, cfg.n_layer, self.wte_ref, self.wpe, self.ln_f_w, self.ln_f_b, self.head_ref,
            tokens.data_ptr(), positions.data_ptr(), plan.cache_rows.data_ptr(), B * T, logit_tokens.data_ptr(),
            plan.n_logits, cfg.n_embd, cfg.n_head, cfg.mlp_dim, cfg.vocab_size, model.max_seq, cfg.layer_norm_epsilon,
            kernels.ACTIVATIONS[cfg.activation_function], *plan.scratch, logits.data_ptr(), plan.threads,
            ctypes.byref(table[0]) if table is not None else None)
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
        if self._lora_pairs is None or self._lora_pairs[0] is not bank or self._lora_pairs[1] != bank.version:
            n_layer = self.config.n_layer
            pairs = (kernels.LoRAPair * max(1, len(bank.slots) * n_layer * 4))()
            for s, slot in enumerate(bank.slots):
                for layer, per_layer in enumerate(slot.pairs if slot is not None else []):
                    for j, pair in enumerate(per_layer):
                        if pair is not None:
                            a, b = pair
                            pairs[(s * n_layer + layer) * 4 + j] = kernels.LoRAPair(a.data_ptr(), b.data_ptr(),
                                                                                   slot.rank, slot.scale)
            # the slots keep their tensors alive; a bank change (a load or a freed slot) rebuilds the table
            self._lora_pairs = (bank, bank.version, pairs)
        token_slot = lora.row_slots.to(torch.int64).repeat_interleave(T).contiguous()
        tmp = torch.empty(token_slot.numel() * max(1, bank.max_rank))
        table = kernels.LoRATable(token_slot.data_ptr(), ctypes.addressof(self._lora_pairs[2]), tmp.data_ptr(),
                                  max(1, bank.max_rank))
        return table, [token_slot, tmp]

    def _plan(self, B: int, T: int, first_row: int, all_logits: bool) -> _Plan:
        """The index tensors and scratch buffers of a forward of this shape: kept from the last forward of
        the same shape (a decode step repeats one shape; making them again cost more than the C code's
        own overhead)."""
        key = (B, T, first_row, all_logits, self.model.max_seq, torch.get_num_threads())
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


class _WeightsWatch:
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
        # map() and list equality run in C: about 60-75 us for GPT-2 124M (800 entries and the hook tables)
        return ([len(table) for table in self.tables] == self.sizes
                and all(map(operator.is_, [table.get(name) for table, name in self.keys], self.values))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.addresses)


def inference_runner(model: GPT2) -> KernelRunner | None:
    """How ``model`` runs a cached forward now: a :class:`KernelRunner` (made or reused), or None for
    GPT2's PyTorch code. The only place that decides.

    None in training mode, when autograd would need gradients, without the kernels
    (``GPT2LAB_CPU_KERNELS=0``, no compiler) and for models they cannot run (:meth:`KernelRunner.supports`).
    """
    if model.training or torch.is_grad_enabled() or not kernels.available():
        return None
    cached = model.__dict__.get("_runner")
    held = model.__dict__.get("_unchanged")  # inside unchanged_weights(): check once, not every forward
    if cached is not None and ((held is not None and held[1]) or cached[0].fresh()):
        runner = cached[1]
    else:
        runner = None
        if KernelRunner.supports(model):
            place_on_huge_pages(model)
            runner = KernelRunner(model)
        model.__dict__["_runner"] = (_WeightsWatch(model), runner)  # not a submodule: out of state_dict, .modules()
    if held is not None:
        held[1] = True
    return runner


@contextlib.contextmanager
def unchanged_weights(model: GPT2) -> Iterator[GPT2]:
    """A block in which the caller promises that nothing replaces ``model``'s tensors or modules or adds a
    forward hook: :func:`inference_runner` checks the runner against the model at the block's first
    forward only, not before each. Writing into the tensors stays fine (the kernels read them in place).

    For a loop that owns the model from step to step (``Generator.generate``, the server's engine
    thread): the check costs 0.15 ms of an int8 decode step of GPT-2 124M that takes 3-9 ms, almost
    all of it cache misses, the weights having just streamed through the caches. Blocks nest, and every
    block's first forward checks (a server "call" that swaps the weights and then generates holds the engine
    thread's block and generate()'s). Code in the block that may change the model calls :func:`recheck_weights`
    after it.
    """
    held = model.__dict__.setdefault("_unchanged", [0, False])
    held[0] += 1
    held[1] = False  # a block's first forward checks, a nested one's too: code before it may have changed the model
    try:
        yield model
    finally:
        held[0] -= 1
        if held[0] == 0:
            del model.__dict__["_unchanged"]


def recheck_weights(model: GPT2) -> None:
    """Inside :func:`unchanged_weights`: the next forward checks the runner against the model again."""
    held = model.__dict__.get("_unchanged")
    if held is not None:
        held[1] = False


HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page
# tensors from half a huge page up move: at most half of a tensor's last page is left unused. GPT-2 124M's
# int8 QKV weights are 1.77 MB; moving them too took an int8 batch-1 forward from 7.2-9.3 to 6.8-7.1 ms.
MIN_HUGE_BYTES = HUGE_PAGE // 2
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_pages_available() -> bool:
    try:
        mode = _THP_MODE.read_text()
    except OSError:  # not Linux, or no transparent huge pages
        return False
    return "[never]" not in mode and hasattr(mmap, "MADV_HUGEPAGE")


def _huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor ``t`` in anonymous memory, 2 MB aligned, that the kernel backs with huge pages
    (``madvise(MADV_HUGEPAGE)`` before the first touch). Freed when the tensor is."""
    nbytes = t.numel() * t.element_size()
    # private: an anonymous shared mapping is shmem, which has its own (usually off) huge page setting
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    start = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    # a storage of exactly the tensor's bytes (the memoryview keeps the mapping alive): a view into a larger
    # one made safetensors refuse to save the model ("None is covering the entire storage") and torch.save
    # write the 2 MB of slack with every tensor
    out = torch.frombuffer(memoryview(area)[start:start + nbytes], dtype=t.dtype).view(t.shape)
    out.copy_(t)
    return out


def place_on_huge_pages(model: nn.Module) -> None:
    """Move every CPU parameter and buffer of at least 1 MB into memory backed by 2 MB pages, in place
    (``tensor.data = copy``: the same Parameter objects, tied weights stay tied; optimizers and training
    are unaffected). Done once, when the kernels first run a model; KV caches are left alone.

    Why: a decode step streams every weight once, and with 4 KB pages that is a TLB miss every 4 KB (40,000
    a step for GPT-2 124M in int8). Measured here (2 threads): a plain read of 512 MB goes from 29-30 to
    33-37 GB/s, an fp32 decode step from 17.4 to 15.6 ms. Linux's transparent huge pages in ``madvise`` or
    ``always`` mode only; elsewhere nothing changes. ``GPT2LAB_HUGE_PAGES=0`` switches it off.
    """
    if os.environ.get("GPT2LAB_HUGE_PAGES", "1") == "0" or not _huge_pages_available():
        return
    # outside inference mode: the copies must be ordinary tensors, or training this model later would fail
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if isinstance(module, KVCache):
                continue
            for t in [*module._parameters.values(), *module._buffers.values()]:
                if (t is None or t.device.type != "cpu" or getattr(t, "_gpt2lab_huge_pages", False)
                        or t.numel() * t.element_size() < MIN_HUGE_BYTES or not t.is_contiguous()):
                    continue
                try:
                    t.data = _huge_page_copy(t)
                except (OSError, ValueError, RuntimeError):  # no memory for a mapping: keep the tensor as it is
                    continue
                t._gpt2lab_huge_pages = True


def optimize_for_inference(model: GPT2, batch_size: int = 1) -> GPT2:
    """Kept for compatibility: a model runs at its fastest without this call (see :func:`inference_runner`).

    Puts ``model`` in eval mode and returns it. ``batch_size`` is validated (an integer >= 1) and
    otherwise unused. Raises TypeError for anything but a :class:`GPT2`.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"optimize_for_inference expects a gpt2lab GPT2 model, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if model.wte.weight.device.type == "cuda":  # the GPU's own path: CUDA graphs (model/cuda_graphs.py)
        from .cuda_graphs import prepare_for_inference

        return prepare_for_inference(model)
    return model.eval()
