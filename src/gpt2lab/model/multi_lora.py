"""Several LoRA adapters over one base model, each row of a batch with its own (or none): the base weights
are read once per forward and each row adds its own adapter's low-rank product.

This is the idea of punica (Chen et al., 2023, "Punica: Multi-Tenant LoRA Serving") and S-LoRA (Sheng et
al., 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters"), as vLLM serves LoRA: the rows of a
batch are grouped by adapter and each group gets one small product ``(x A^T) B^T * scale`` per adapted
projection, added to the base projection's output. Unlike :func:`gpt2lab.model.lora.merge_lora`, nothing
is folded into the base weights, so adapters are loaded and unloaded while the model serves, and rows of
different adapters (and of none) share one forward.

:class:`LoRABank` holds the adapters of one model by name, each in a slot (the index rows refer to it by);
a :class:`LoRAMapping` says which slot each row of a forward uses. The runtime
(:func:`gpt2lab.runtime.forward`) applies them: gpt2lab's C kernels add each token's delta right after the
base product (the one forward call), and the model's PyTorch code gets the same additions through
forward hooks on the projections (:func:`lora_hooks`), only for the duration of that forward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .gpt2 import GPT2
from .lora import lora_scale

# the adapted projections of a block, in the order the kernels' table holds them
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def block_linears(block: nn.Module) -> list[nn.Module]:
    """The projections of a block, in :data:`BLOCK_LINEARS`' order."""
    return [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]


@dataclass(eq=False)
class LoRASlot:
    """One loaded adapter: its ``name``, ``uid`` (unique for every load: what cached keys and values are
    keyed by), ``rank``, ``scale`` and, per layer and projection, its ``(A [r, in], B^T [r, out])`` pair in
    float32 on the model's device (None where it leaves the projection alone; B transposed so that the kernels
    add each rank's column over contiguous outputs)."""

    name: str
    uid: int
    rank: int
    scale: float
    pairs: list[list[tuple[torch.Tensor, torch.Tensor] | None]]
    users: int = 0  # rows (of any engine) using it now
    removed: bool = False  # unloaded: freed once no row uses it
    path: str | None = field(default=None)


class LoRABank:
    """The LoRA adapters of one :class:`GPT2`, by name, each in a slot.

    Not thread-safe: one thread (an engine's) adds, removes and uses it. Rows hold their adapter with
    :meth:`acquire` / :meth:`release`; :meth:`remove` takes the name away at once and frees the slot when
    its last row is released, so an unload never changes a running request's arithmetic.
    """

    _uids = itertools.count(1)

    def __init__(self, model: GPT2) -> None:
        self.model = model
        self.slots: list[LoRASlot | None] = []
        self._by_name: dict[str, int] = {}
        self.version = 0  # changes whenever a slot is filled or freed (the kernels' table is rebuilt)

    # -- adapters ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The adapters loaded now, in loading order."""
        return list(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def add(self, name: str, state: Mapping[str, torch.Tensor], rank: int, alpha: float,
            use_rslora: bool = False, path: str | None = None) -> int:
        """Load an adapter under ``name``: ``state`` keyed ``<module>.lora_A`` (``[r, in]``) / ``<module>.lora_B``
        (``[out, r]``) by the model's module names (``h.0.attn.c_attn``), as
        :func:`gpt2lab.checkpoints.adapters.read_adapter` gives them; returns its slot. ``ValueError`` naming
        the problem: a name already loaded, a module that is not one of the blocks' projections, a tensor
        of the wrong shape or kind, an A without its B."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._by_name:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0 and alpha < float("inf")):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        cfg = self.model.config
        where = {f"h.{i}.{suffix}": (i, j) for i in range(cfg.n_layer) for j, suffix in enumerate(BLOCK_LINEARS)}
        device = self.model.wte.weight.device
        pairs: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[None] * 4 for _ in range(cfg.n_layer)]
        modules = dict.fromkeys(key.rpartition(".")[0] for key in state)
        for module in modules:
            if module not in where:
                raise ValueError(f"adapter tensor for {module!r}: not one of the model's block projections "
                                 f"({', '.join(BLOCK_LINEARS)} of h.0..h.{cfg.n_layer - 1})")
            a, b = state.get(f"{module}.lora_A"), state.get(f"{module}.lora_B")
            if a is None or b is None:
                raise ValueError(f"adapter module {module}: lora_A and lora_B come in pairs, one is missing")
            layer, j = where[module]
            linear = block_linears(self.model.h[layer])[j]
            n_in, n_out = _features(linear)
            for which, tensor, shape in (("lora_A", a, (rank, n_in)), ("lora_B", b, (n_out, rank))):
                if not tensor.is_floating_point():
                    raise ValueError(f"adapter tensor {module}.{which} is {tensor.dtype}; LoRA matrices are "
                                     "floating point")
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"adapter tensor {module}.{which} has shape {tuple(tensor.shape)}, expected "
                                     f"{shape} (rank {rank}, {module} is {n_in} -> {n_out})")
            pairs[layer][j] = (a.detach().to(device=device, dtype=torch.float32).contiguous(),
                               b.detach().to(device=device, dtype=torch.float32).t().contiguous())
        if not modules:
            raise ValueError("the adapter holds no LoRA tensors")
        slot = LoRASlot(name, next(self._uids), rank, lora_scale(rank, alpha, use_rslora), pairs, path=path)
        free = next((i for i, s in enumerate(self.slots) if s is None), len(self.slots))
        if free == len(self.slots):
            self.slots.append(slot)
        else:
            self.slots[free] = slot
        self._by_name[name] = free
        self.version += 1
        return free

    def remove(self, name: str) -> None:
        """Unload ``name`` (``KeyError`` naming it when it is not loaded): new rows cannot use it any more,
        running ones keep it until they end."""
        if name not in self._by_name:
            raise KeyError(f"no adapter named {name!r} is loaded")
        index = self._by_name.pop(name)
        slot = self.slots[index]
        slot.removed = True
        if slot.users == 0:
            self._free(index)

    def slot(self, name: str) -> int:
        """The slot of adapter ``name``; ``KeyError`` naming it when it is not loaded."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no adapter named {name!r} is loaded") from None

    def uid(self, index: int) -> int:
        """The unique id of the adapter in slot ``index`` (0 for no adapter, ``index < 0``)."""
        return self.slots[index].uid if index >= 0 else 0

    def acquire(self, index: int) -> None:
        """A row starts using slot ``index`` (``-1``: no adapter, nothing to do)."""
        if index >= 0:
            self.slots[index].users += 1

    def release(self, index: int) -> None:
        """A row stops using slot ``index``; an unloaded adapter's slot is freed with its last row."""
        if index >= 0:
            slot = self.slots[index]
            slot.users -= 1
            if slot.users == 0 and slot.removed:
                self._free(index)

    def _free(self, index: int) -> None:
        self.slots[index] = None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        self.version += 1

    @property
    def max_rank(self) -> int:
        return max((s.rank for s in self.slots if s is not None), default=0)


def _features(linear: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection (``nn.Linear`` or its quantized twin)."""
    return int(linear.in_features), int(linear.out_features)


@dataclass(frozen=True)
class LoRAMapping:
    """Which adapter each row of a forward uses: ``row_slots [B]`` (int64, ``-1`` for the base model) into
    ``bank``'s slots."""

    bank: LoRABank
    row_slots: torch.Tensor

    @staticmethod
    def of(bank: LoRABank | None, slots: list[int]) -> LoRAMapping | None:
        """The mapping of rows using ``slots`` (one per row), or None when no row uses an adapter."""
        if bank is None or all(s < 0 for s in slots):
            return None
        return LoRAMapping(bank, torch.tensor(slots, dtype=torch.int64))

    def groups(self, token_slots: torch.Tensor) -> list[tuple[LoRASlot, torch.Tensor]]:
        """``(slot, token indices)`` per adapter used by ``token_slots`` (one entry per token)."""
        out = []
        for index in torch.unique(token_slots).tolist():
            if index >= 0:
                out.append((self.bank.slots[index], torch.nonzero(token_slots == index).flatten()))
        return out


def lora_delta(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: float) -> torch.Tensor:
    """One group's low-rank addition ``(x A^T) B^T * scale`` for ``x [N, in]``, ``bt = B^T [r, out]`` (peft's
    order of operations)."""
    return (x.float() @ a.t() @ bt) * scale


@contextlib.contextmanager
def lora_hooks(model: GPT2, mapping: LoRAMapping | None, tokens_per_row: int) -> Iterator[None]:
    """For the PyTorch forward inside the block: each adapted projection's output gets its rows' deltas
    (forward hooks, removed on exit). ``tokens_per_row``: the ``T`` of the forward's ``[B, T]`` input."""
    if mapping is None:
        yield
        return
    token_slots = mapping.row_slots.to(model.wte.weight.device).repeat_interleave(tokens_per_row)
    groups = mapping.groups(token_slots)
    handles = []

    def hook_for(layer: int, j: int):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            flat = out.reshape(-1, out.shape[-1])
            added = None
            for slot, index in groups:
                pair = slot.pairs[layer][j]
                if pair is not None:
                    if added is None:
                        added = flat.clone()
                    added[index] += lora_delta(x[index], *pair, slot.scale).to(out.dtype)
            return out if added is None else added.view(out.shape)
        return hook

    try:
        for layer, block in enumerate(model.h):
            for j, linear in enumerate(block_linears(block)):
                handles.append(linear.register_forward_hook(hook_for(layer, j)))
        yield
    finally:
        for handle in handles:
            handle.remove()
