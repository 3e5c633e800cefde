"""How a forward of a :class:`~gpt2lab.model.GPT2` runs: the one place that decides, for every cached
forward, between gpt2lab's C kernels (CPU), a replayed CUDA graph (a decode step on a GPU) and the
model's own eager PyTorch code.

The model (:mod:`gpt2lab.model.gpt2`) knows nothing of who runs it: ``model(idx, input_pos=...)`` is
always its plain PyTorch code, and it carries no runner state. Code that generates asks this module instead:

- :func:`forward`: any cached forward (a prefill, ragged rows, a decode step of some rows);
- :func:`decode`: one decode step of the running rows ``0..n-1`` (the engine's layout), which may
  replay a CUDA graph;
- :func:`unchanged_weights` / :func:`recheck_weights`: a loop that owns the model promises its tensors
  stay the same, so the kernels' runner is checked once per block instead of before each forward.

:func:`forward` and :func:`decode` take ``lora=``: a :class:`~gpt2lab.model.multi_lora.LoRAMapping` giving each
row its LoRA adapter (or none); the base weights are read once and each row adds its adapter's low-rank
products (in the C kernels' one call, or through forward hooks on the PyTorch code).

The decisions are :func:`inference_runner` (the C kernels, :mod:`.cpu_kernels`) and :func:`graph_decoder`
(CUDA graphs, :mod:`.cuda_graphs`). What they keep for a model (the kernels' runner and the watch on its
weights, the open :func:`unchanged_weights` blocks, the captured graphs) lives here, in a dictionary keyed
weakly by the model: a model deep-copies and pickles as a plain module, and state dies with its model.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator, Sequence

import torch

from .. import kernels
from ..model import GPT2
from ..model.multi_lora import LoRAMapping, lora_hooks
from .cpu_kernels import KernelRunner, WeightsWatch
from .cuda_graphs import GraphDecoder
from .huge_pages import place_on_huge_pages
from .threads import AUTO, pinned_threads, set_threads, usable_cpus

__all__ = ["forward", "decode", "unchanged_weights", "recheck_weights", "inference_runner", "graph_decoder",
           "KernelRunner", "GraphDecoder", "AUTO", "set_threads", "pinned_threads", "usable_cpus"]

GRAPHS_ENV = "GPT2LAB_CUDA_GRAPHS"  # "0" turns CUDA graphs off (eager decode on the GPU)
COMPILE_ENV = "GPT2LAB_COMPILE"  # "1" compiles the decode step with torch.compile before capture


class _ModelState:
    """What the runtime keeps for one model."""

    __slots__ = ("watch", "runner", "blocks", "checked", "graphs")

    def __init__(self) -> None:
        self.watch: WeightsWatch | None = None  # None: no runner decided yet
        self.runner: KernelRunner | None = None  # None (with a watch): the model's PyTorch code
        self.blocks = 0  # unchanged_weights blocks open on the model
        self.checked = False  # inside them: the runner was checked since the innermost block opened
        self.graphs: GraphDecoder | None = None


# keyed weakly, and no value holds its model strongly (runners and decoders keep weak references)
_states: weakref.WeakKeyDictionary[GPT2, _ModelState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(model: GPT2) -> _ModelState:
    state = _states.get(model)
    if state is None:
        with _states_lock:  # two threads meeting a new model make one state
            state = _states.get(model)
            if state is None:
                state = _states[model] = _ModelState()
    return state


def forward(model: GPT2, idx: torch.Tensor, *, input_pos: torch.Tensor, rows: slice | None = None,
            logits_index: torch.Tensor | None = None, lora: LoRAMapping | None = None) -> torch.Tensor:
    """A cached forward: logits for tokens ``idx [B, T]`` at positions ``input_pos [B, T]`` of cache rows
    ``rows`` (default ``0..B-1``); ``[B, V]`` at ``logits_index [B]`` when given, else ``[B, T, V]``.
    ``lora``: each row's LoRA adapter (None: the base model for every row).

    Runs on gpt2lab's C kernels where they can run this model (:func:`inference_runner`), else on the
    model's PyTorch code; both give the same logits within fp32 rounding. Raises as
    :meth:`GPT2.forward` does (``RuntimeError`` without a KV cache, ``ValueError``/``IndexError`` for
    positions, rows or token ids outside it).
    """
    runner = inference_runner(model)
    if runner is not None:
        return runner(idx, input_pos, rows, logits_index, lora)
    if lora is None:
        return model(idx, input_pos=input_pos, rows=rows, logits_index=logits_index)
    with lora_hooks(model, lora, idx.shape[1]):
        return model(idx, input_pos=input_pos, rows=rows, logits_index=logits_index)


def decode(model: GPT2, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int] | int, *,
           lora: LoRAMapping | None = None) -> torch.Tensor:
    """One decode step of cache rows ``0..n-1``: next-token logits ``[n, V]`` for ``tokens`` (``n`` ints, or
    a 1-D tensor on the model's device) at ``positions`` (one int per row, or one int for all); ``lora``:
    each row's adapter, as :func:`forward`'s.

    Where :func:`graph_decoder` says so the step replays a captured CUDA graph (never for a step in which a
    row uses a LoRA adapter); elsewhere it is :func:`forward` with one token per row."""
    graphs = graph_decoder(model) if lora is None else None
    if graphs is not None:
        return graphs.decode(tokens, positions)
    device = model.wte.weight.device
    idx = torch.as_tensor(tokens, dtype=torch.long, device=device).reshape(-1, 1)
    n = idx.shape[0]
    if isinstance(positions, int):
        pos = torch.full((n, 1), positions, dtype=torch.long, device=device)
    else:
        pos = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(n, 1)
    return forward(model, idx, input_pos=pos, rows=slice(0, n), lora=lora)[:, -1]


def inference_runner(model: GPT2) -> KernelRunner | None:
    """How ``model`` runs a cached forward now: a :class:`KernelRunner` (made or reused), or None for
    GPT2's PyTorch code. The only place that decides it.

    None in training mode, when autograd would need gradients, without the kernels
    (``GPT2LAB_CPU_KERNELS=0``, no compiler) and for models they cannot run (:meth:`KernelRunner.supports`).
    A runner is made again whenever the model's tensors, modules or hooks changed since it was made
    (:class:`~gpt2lab.runtime.cpu_kernels.WeightsWatch`; inside :func:`unchanged_weights`, at a block's
    first forward only). Making one moves the model's big tensors onto huge pages
    (:func:`~gpt2lab.runtime.huge_pages.place_on_huge_pages`).
    """
    if model.training or torch.is_grad_enabled() or not kernels.available():
        return None
    state = _state(model)  # the one dictionary lookup of a forward
    if state.watch is None or not (state.checked or state.watch.fresh()):
        runner = None
        if KernelRunner.supports(model):
            place_on_huge_pages(model)
            runner = KernelRunner(model)
        state.watch, state.runner = WeightsWatch(model), runner
    if state.blocks:
        state.checked = True
    return state.runner


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
    state = _state(model)
    state.blocks += 1
    state.checked = False  # a block's first forward checks, a nested one's too: code before it may have changed it
    try:
        yield model
    finally:
        state.blocks -= 1
        if state.blocks == 0:
            state.checked = False


def recheck_weights(model: GPT2) -> None:
    """Inside :func:`unchanged_weights`: the next forward checks the runner against the model again."""
    state = _states.get(model)
    if state is not None:
        state.checked = False


def graph_decoder(model: GPT2) -> GraphDecoder | None:
    """The model's :class:`GraphDecoder` when its decode steps should replay CUDA graphs, else None.

    The condition, in one place: the model is on a CUDA device, in eval mode, and ``GPT2LAB_CUDA_GRAPHS``
    is not ``0`` (``GPT2LAB_COMPILE=1`` compiles the step first). Made once per model and kept here, so every
    engine and beam search over the model shares the captured graphs.
    """
    if model.wte.weight.device.type != "cuda" or model.training or os.environ.get(GRAPHS_ENV, "1") == "0":
        return None
    state = _state(model)
    if state.graphs is None:
        state.graphs = GraphDecoder(model, compile=os.environ.get(COMPILE_ENV, "0") == "1")
    return state.graphs
