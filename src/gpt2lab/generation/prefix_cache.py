"""Prefix reuse: the keys and values of recent prompts (and of finished conversations' turns) kept in a
bounded pool, so a request that starts with a cached prefix prefills only the rest.

The scheme is vLLM's automatic prefix caching: a sequence is cut into blocks of ``block_size`` tokens and
each full block is known by its tokens and its parent block (so by the whole prefix up to its end; SGLang
keeps the same prefixes in a radix tree). A block's entry is keyed by ``(parent block id, its tokens, the
adapter)`` in a dictionary: two prefixes share an entry only when they are equal token for token (the
dictionary compares keys, so a hash collision cannot hand one request another's cache), and a LoRA
adapter's keys and values never serve the base model or another adapter. The pool is bounded in bytes
and evicts the least recently used block first; when a chain is used, its blocks are touched deepest
first, so a shared root outlives the branches hanging off it.

The static KV cache of the engine (:class:`~gpt2lab.model.KVCache`, one row per running sequence) is not
paged: a hit copies the cached blocks into the new row's first slots (a memory copy, far cheaper than
computing them) and the prefill starts after them. With gpt2lab's C kernels every token's keys and values
are computed by the same arithmetic whatever else the forward holds (batch invariance), so a request's
tokens and logprobs are bit-identical with and without the pool; on PyTorch's own code (a GPU, or the
kernels off) they agree to rounding.

A pool belongs to one model: when the model's weights change (a parameter replaced, or written in place
as an optimizer step does, which bumps its version counter) every block is dropped before the next use.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 16  # tokens per block (vLLM's default)
_DEFAULT_SHARE = 0.05  # of the machine's memory (a GPU's own, for a model on one)
_DEFAULT_CAP = 4 << 30  # bytes


def default_capacity(device: torch.device | str = "cpu") -> int:
    """The pool size when none is given, in bytes: 5% of the device's memory (the machine's RAM for the
    CPU), at most 4 GiB."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):  # no sysconf (not POSIX), no GPU properties
        total = 8 << 30
    return int(min(total * _DEFAULT_SHARE, _DEFAULT_CAP))


@dataclass(eq=False)
class _Block:
    id: int
    key: tuple
    k: torch.Tensor  # [n_layer, n_head, block_size, head_dim]
    v: torch.Tensor


@dataclass
class PrefixCacheStats:
    """Counters since the pool was made: requests that found a cached prefix (``hits``) or none
    (``misses``), prompt tokens they did not prefill (``saved_tokens``), blocks evicted."""

    hits: int = 0
    misses: int = 0
    saved_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    """A pool of at most ``capacity`` bytes of cached key/value blocks of ``block_size`` tokens.

    Used by one engine at a time, from one thread (a :class:`~.generator.Generator` keeps one for the
    engines it makes, so that consecutive calls and chat turns share it). ``capacity=0`` keeps nothing.
    Raises ValueError for a negative capacity or a block size below 1.
    """

    def __init__(self, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be an integer >= 0 (bytes), got {capacity!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.capacity, self.block_size = capacity, block_size
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # key -> block, least recently used first
        self._next_id = 1
        self._bytes = 0
        self._weights: tuple | None = None

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def bytes(self) -> int:
        """Bytes the cached blocks hold now."""
        return self._bytes

    def __len__(self) -> int:
        """Blocks cached now."""
        return len(self._blocks)

    def clear(self) -> None:
        """Drop every block (the counters stay)."""
        self._blocks.clear()
        self._bytes = 0

    def check_weights(self, model: torch.nn.Module) -> None:
        """Drop every block when ``model``'s tensors are not the ones the blocks were computed with (replaced,
        moved, or written in place since the last call). About 10 us for GPT-2 124M: once per admission."""
        tensors = [*model.parameters()]
        fingerprint = (len(tensors), *((t.data_ptr(), t._version) for t in tensors))
        if fingerprint != self._weights:
            self.clear()
            self._weights = fingerprint

    # -- lookup --------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], extra: Hashable = 0, *, limit: int | None = None) -> list[_Block]:
        """The cached blocks of the longest cached prefix of ``tokens`` under ``extra`` (the adapter's uid, 0 for the
        base model), in order,
        covering at most ``limit`` tokens (default: all but the last token, whose logits the prefill must
        compute). Touches them (most recently used) and counts a hit or a miss."""
        limit = len(tokens) - 1 if limit is None else limit
        found: list[_Block] = []
        if self.enabled:
            parent, bs = 0, self.block_size
            for start in range(0, limit - bs + 1, bs):
                block = self._blocks.get((parent, tuple(tokens[start:start + bs]), extra))
                if block is None:
                    break
                found.append(block)
                parent = block.id
            self._touch(found)
        if found:
            self.stats.hits += 1
            self.stats.saved_tokens += len(found) * self.block_size
        else:
            self.stats.misses += 1
        return found

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # the root ends up most recent: evicted after its children
            self._blocks.move_to_end(block.key)

    # -- moving keys and values --------------------------------------------------------------------------
    def load(self, caches: Sequence, row: int, blocks: list[_Block]) -> int:
        """Copy ``blocks`` into slots ``0..`` of cache row ``row`` (``caches``: the model's per-layer
        :class:`~gpt2lab.model.KVCache`); returns the number of tokens they cover."""
        if not blocks:
            return 0
        n = len(blocks) * self.block_size
        for layer, cache in enumerate(caches):
            cache.k[row, :, :n] = torch.cat([b.k[layer] for b in blocks], dim=1)
            cache.v[row, :, :n] = torch.cat([b.v[layer] for b in blocks], dim=1)
        return n

    def store(self, caches: Sequence, row: int, tokens: Sequence[int], extra: Hashable = 0) -> None:
        """Keep the full blocks of ``tokens`` (whose keys and values sit in slots ``0..len(tokens)-1`` of cache
        row ``row``) that are not cached yet, evicting least recently used blocks to stay within capacity."""
        bs = self.block_size
        n_blocks = len(tokens) // bs
        if not self.enabled or n_blocks == 0:
            return
        chain, parent, first_new = [], 0, None
        for j in range(n_blocks):
            key = (parent, tuple(tokens[j * bs:(j + 1) * bs]), extra)
            block = self._blocks.get(key)
            if block is None:
                first_new = j
                break
            chain.append(block)
            parent = block.id
        if first_new is not None:
            start, end = first_new * bs, n_blocks * bs
            k = torch.stack([c.k[row, :, start:end] for c in caches])  # [n_layer, n_head, n, head_dim]
            v = torch.stack([c.v[row, :, start:end] for c in caches])
            size = 2 * k[:, :, :bs].numel() * k.element_size()
            for j in range(first_new, n_blocks):
                if not self._make_room(size, keep=chain):  # only the chain's own blocks left: its tail stays out
                    break
                lo = (j - first_new) * bs
                key = (parent, tuple(tokens[j * bs:(j + 1) * bs]), extra)
                block = _Block(self._next_id, key, k[:, :, lo:lo + bs].clone(), v[:, :, lo:lo + bs].clone())
                self._next_id += 1
                self._blocks[key] = block
                self._bytes += size
                chain.append(block)
                parent = block.id
        self._touch(chain)

    def _make_room(self, size: int, keep: list[_Block]) -> bool:
        """Evict least recently used blocks until ``size`` more bytes fit, never those of ``keep`` (the chain
        being stored: a block without its parent could never be matched); False when they cannot fit."""
        kept = {b.id for b in keep}
        victims = (key for key, block in list(self._blocks.items()) if block.id not in kept)  # oldest first
        while self._bytes + size > self.capacity:
            key = next(victims, None)
            if key is None:
                return False
            block = self._blocks.pop(key)
            self._bytes -= 2 * block.k.numel() * block.k.element_size()
            self.stats.evictions += 1
        return True
