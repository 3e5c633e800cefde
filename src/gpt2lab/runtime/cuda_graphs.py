"""Decode steps as CUDA graphs, one per (batch bucket, KV-length bucket): gpt-fast's and vLLM's recipe.

A decode step of GPT-2 124M is ~150 small kernels; launched one by one from Python, a step at batch 1
is bound by launch overhead, not by the GPU. A CUDA graph records the kernels of one step once and
replays them with one launch. Graphs need static shapes and addresses, so a step runs on static
input buffers (token ids and positions), the batch is padded up to a bucket (1, 2, 4, 8, ... rows,
capped at the KV cache's rows) and attention reads a fixed number of cache slots (a multiple of
``KV_BUCKET``, masked per row by position) instead of a length that changes every step.

Padding rows take token 0 at position 0 in the cache rows after the running ones: those rows hold no
live sequence (the engine keeps its running rows at ``0..n-1``; beam search its beams), and a row is
prefilled before it is used. A graph is captured the first time its shapes are needed: two eager
warm-up runs on a side stream with the real inputs (so the cache writes they make are the ones the
step makes anyway), then the capture. A new KV cache (``setup_cache`` growing it) drops the graphs.

:func:`static_decode` is the step itself: the model's own forward (:meth:`GPT2.forward`) with the number of
cache slots given (``kv_len=``), which makes every shape static and reads nothing back to the host; it also
runs on the CPU, where tests compare it with the ordinary cached forward. ``torch.compile`` of the step is
optional (``compile=True``, or ``GPT2LAB_COMPILE=1``): it fuses the LayerNorm/GELU/residual kernels before
the graph is captured; off by default until it is measured on a GPU. When a model's steps replay graphs is
decided in :mod:`gpt2lab.runtime` (:func:`gpt2lab.runtime.graph_decoder`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ..model import GPT2

KV_BUCKET = 256  # attention reads a multiple of this many cache slots (the engine's cache granule)


def batch_bucket(rows: int, max_rows: int) -> int:
    """The padded batch a step of ``rows`` rows runs at: the next power of two, at most ``max_rows``."""
    if not 1 <= rows <= max_rows:
        raise ValueError(f"rows must be in [1, {max_rows}] (the KV cache's rows), got {rows}")
    return min(1 << (rows - 1).bit_length(), max_rows)


def kv_bucket(kv_len: int, max_seq: int) -> int:
    """Cache slots attention reads for a step whose furthest row sees ``kv_len`` slots."""
    if not 1 <= kv_len <= max_seq:
        raise ValueError(f"kv_len must be in [1, {max_seq}] (the KV cache's slots), got {kv_len}")
    return min(-(-kv_len // KV_BUCKET) * KV_BUCKET, max_seq)


def static_decode(model: GPT2, idx: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """One decode step with static shapes: logits ``[B, V]`` for tokens ``idx [B]`` at positions ``pos [B]``.

    Row ``b`` writes its key/value at slot ``pos[b]`` of cache row ``b`` and attends to slots
    ``<= pos[b]`` among the first ``kv_len``. It is the model's own cached forward with ``kv_len`` given
    (:meth:`GPT2.forward`), so every shape depends only on ``(B, kv_len)`` and nothing reads a value back
    to the host: the step can be captured as a CUDA graph.
    """
    return model(idx[:, None], input_pos=pos[:, None], rows=slice(0, idx.shape[0]), kv_len=kv_len)[:, 0]


class _Graph:
    """One captured step: its static inputs, output and the graph (None: run eagerly, e.g. on the CPU)."""

    def __init__(self, idx: torch.Tensor, pos: torch.Tensor, out: torch.Tensor | None,
                 graph: torch.cuda.CUDAGraph | None) -> None:
        self.idx, self.pos, self.out, self.graph = idx, pos, out, graph


class GraphDecoder:
    """Decode steps of a model on its KV cache rows ``0..n-1``, replayed from CUDA graphs.

    ``decode(tokens, positions)`` is the whole interface: ``tokens`` (a list of ints or a 1-D tensor
    on the model's device) and ``positions`` (ints, or one int for every row) of the ``n`` running
    rows; returns their next-token logits ``[n, V]`` on the model's device, in the model's dtype.
    ``use_graphs=False`` runs the same padded static step eagerly (the CPU, and tests).
    """

    def __init__(self, model: GPT2, *, use_graphs: bool = True, compile: bool = False) -> None:  # noqa: A002
        # weakly: the runtime keeps decoders in a dictionary keyed weakly by their model
        self._model = weakref.ref(model)
        self.device = model.wte.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.step_fn = static_decode
        if compile:
            self.step_fn = torch.compile(static_decode, fullgraph=True, dynamic=False,
                                         mode="max-autotune-no-cudagraphs")
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._cache_key: tuple | None = None
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)

    @property
    def model(self) -> GPT2:
        """The model whose steps this decoder runs (ReferenceError once it no longer exists)."""
        model = self._model()
        if model is None:
            raise ReferenceError("this GraphDecoder's model no longer exists")
        return model

    def _check_cache(self) -> None:
        caches = self.model.caches()
        if not caches or caches[0] is None:
            raise RuntimeError("call model.setup_cache() before decoding")
        key = (caches[0].k.data_ptr(), self.model.max_batch, self.model.max_seq)
        if key != self._cache_key:  # a new cache: the captured addresses are stale
            self.graphs.clear()
            self._cache_key = key

    def decode(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int] | int) -> torch.Tensor:
        """Next-token logits ``[n, V]`` of rows ``0..n-1`` (see the class docstring)."""
        self._check_cache()
        model = self.model
        n = len(tokens)
        pos_list = [positions] * n if isinstance(positions, int) else list(positions)
        if len(pos_list) != n or n == 0:
            raise ValueError(f"give one position per token: {n} tokens, {len(pos_list)} positions")
        top = max(pos_list)
        if min(pos_list) < 0 or top >= model.max_seq:
            raise ValueError(f"positions must be in [0, {model.max_seq - 1}] (the KV cache's slots)")
        bucket = batch_bucket(n, model.max_batch)
        key = (bucket, kv_bucket(top + 1, model.max_seq))
        entry = self.graphs.get(key)
        if entry is None:
            entry = _Graph(torch.zeros(bucket, dtype=torch.long, device=self.device),
                           torch.zeros(bucket, dtype=torch.long, device=self.device), None, None)
        # the only host-to-device traffic of a step: token ids (when they come from the host) and positions
        pos_host = torch.zeros(bucket, dtype=torch.long)
        pos_host[:n] = torch.tensor(pos_list, dtype=torch.long)
        entry.pos.copy_(pos_host, non_blocking=True)
        if isinstance(tokens, torch.Tensor):
            entry.idx[n:].zero_()
            entry.idx[:n].copy_(tokens.reshape(n))
        else:
            idx_host = torch.zeros(bucket, dtype=torch.long)
            idx_host[:n] = torch.tensor(list(tokens), dtype=torch.long)
            entry.idx.copy_(idx_host, non_blocking=True)
        if not self.use_graphs:
            return self.step_fn(model, entry.idx, entry.pos, key[1])[:n]
        if entry.graph is None:
            self._capture(entry, key[1])
            self.graphs[key] = entry
        entry.graph.replay()
        return entry.out[:n].clone()  # the next replay overwrites the static output

    def _capture(self, entry: _Graph, kv_len: int) -> None:
        """Warm up on a side stream (with the step's real inputs), then record the step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # allocator, cuBLAS workspaces and (with compile) autotuning settle first
                self.step_fn(self.model, entry.idx, entry.pos, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            entry.out = self.step_fn(self.model, entry.idx, entry.pos, kv_len)
        entry.graph = graph
        self.captures += 1
