"""gpt2lab's own CPU kernels (``kernels.c``), built on first use and called through ctypes: the whole
cached forward of a GPT-2 (``gpt2lab_forward``, driven by :class:`gpt2lab.runtime.cpu_kernels.KernelRunner`),
one linear layer of any weight kind (:func:`linear`, used by the quantized modules), and the two
full-vocabulary scans of a sampling step (:func:`top_k_`, :func:`row_totals`, :func:`inverse_cdf`).

A decode step reads every weight once for a few rows, so its speed is the speed at which the weights
stream from memory (one row) or from cache (a few rows). ``linear`` streams one row's weights at about
the rate of a plain ``sum()``, where oneDNN's and MKL's one-row GEMV reach 60-80% of it on AVX2 CPUs,
and reuses each weight load for two rows when there are several. Measured by ``benchmarks/generate.py``.

The package: :mod:`.build` compiles and caches the library (once per machine, about half a second),
:mod:`.abi` is the one definition of the C interface (the ctypes declarations are built from it, and it is
checked against ``kernels.c``), and this module loads the library and wraps the small operations. It
imports nothing of gpt2lab above it. The library shares torch's OpenMP runtime. Without a compiler, on a
failed build, or with ``GPT2LAB_CPU_KERNELS=0``, :func:`available` is False and callers use torch's
kernels: same results, slower decoding.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch

from . import build
from .abi import CONSTANTS, Layer, LoRAPair, LoRATable, Matrix, bind
from .build import SOURCE, cache_dir, compiler

__all__ = ["ACTIVATIONS", "DISABLE_ENV", "INT4_GROUP_SIZE", "INT4_UNIT", "ISA_ENV", "KIND_BF16", "KIND_F32",
           "KIND_INT4", "KIND_INT8", "Layer", "LoRAPair", "LoRATable", "Matrix", "SOURCE", "WEIGHT_DTYPES", "available",
           "build", "cache_dir", "compiler", "has_avx2", "int4_shapes", "inverse_cdf", "isa", "library", "linear",
           "matrix", "row_totals", "top_k_", "usable"]

logger = logging.getLogger(__name__)

DISABLE_ENV = "GPT2LAB_CPU_KERNELS"
# which instruction-set path to load: "auto" (default: the best this CPU runs, build.cpu_isas()), or one of
# build.ISA_FLAGS ("avx512", "avx2", "portable") to force it, e.g. to test or compare paths
ISA_ENV = "GPT2LAB_KERNELS_ISA"
_ISA_NAMES = {CONSTANTS["ISA_PORTABLE"]: "portable", CONSTANTS["ISA_AVX2"]: "avx2", CONSTANTS["ISA_AVX512"]: "avx512"}

KIND_F32, KIND_INT8, KIND_BF16 = CONSTANTS["KIND_F32"], CONSTANTS["KIND_Q8"], CONSTANTS["KIND_BF16"]
KIND_INT4 = CONSTANTS["KIND_Q4"]  # packed 4-bit weights (uint8 [out, ceil(in / 128) * 64]), model/quantize.py's int4
INT4_GROUP_SIZE = CONSTANTS["Q4_GROUP"]  # inputs per int4 scale: kernels.c's Q4_GROUP (why that size: quantize.py)
INT4_UNIT = 128  # inputs per 64 packed bytes: kernels.c's Q4_UNIT
_KINDS = {torch.float32: KIND_F32, torch.int8: KIND_INT8, torch.bfloat16: KIND_BF16, torch.uint8: KIND_INT4}
WEIGHT_DTYPES = tuple(_KINDS)  # the weight dtypes the kernels read
# GPT2Config.activation_function -> the kernels' epilogue (kernels.c), for every activation gpt2.py knows
ACTIVATIONS = {"gelu_new": CONSTANTS["EPILOGUE_GELU_TANH"], "gelu_pytorch_tanh": CONSTANTS["EPILOGUE_GELU_TANH"],
               "gelu_fast": CONSTANTS["EPILOGUE_GELU_TANH"], "gelu": CONSTANTS["EPILOGUE_GELU"],
               "relu": CONSTANTS["EPILOGUE_RELU"], "silu": CONSTANTS["EPILOGUE_SILU"],
               "swish": CONSTANTS["EPILOGUE_SILU"]}

_library: ctypes.CDLL | None = None
_loaded = False
_load_lock = threading.Lock()


def int4_shapes(n_out: int, n_in: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of a packed int4 weight of ``[n_out, n_in]``: uint8 ``[n_out, ceil(n_in / 128) * 64]`` (each
    64 bytes hold 128 inputs, 16-bit word j input 32 s + j in its nibble s, as kernels.c reads them; an ``n_in``
    that is not a multiple of 128 is padded with zeros) and fp32 scales ``[n_out, ceil(n_in / INT4_GROUP_SIZE)]``."""
    return (n_out, -(-n_in // INT4_UNIT) * (INT4_UNIT // 2)), (n_out, -(-n_in // INT4_GROUP_SIZE))


def matrix(weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> Matrix:
    """The kernels' view of a weight ``[out, in]`` (fp32, bf16, or int8 with fp32 ``scale [out]``, or packed
    int4, uint8 ``[out, ceil(in / 128) * 64]`` with fp32 ``scale [out, ceil(in / INT4_GROUP_SIZE)]``) and an
    optional fp32 ``bias [out]``: pointers into contiguous CPU tensors, which the caller keeps alive.
    KeyError for another weight dtype."""
    return Matrix(weight.data_ptr(), None if scale is None else scale.data_ptr(),
                  None if bias is None else bias.data_ptr(), _KINDS[weight.dtype])


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on the first call; None where the kernels are unavailable.

    Thread-safe: a first call made while another thread is loading it waits for that load (it answered None,
    and the model ran that forward and sampling step through torch's kernels)."""
    if not _loaded:
        with _load_lock:
            if not _loaded:
                _load()
    return _library


def _load() -> None:
    global _library, _loaded
    try:
        if os.environ.get(DISABLE_ENV, "1") != "0":
            try:
                path = build.build(_chosen_isa())
                if path is not None:
                    lib = bind(ctypes.CDLL(str(path)))
                    if not lib.gpt2lab_has_avx2() and os.environ.get(ISA_ENV, "auto") in ("", "auto"):
                        logger.warning("gpt2lab's CPU kernels were built without AVX2/FMA (this CPU or compiler "
                                       "lacks them): results are the same, decoding is several times slower")
                    _library = lib
            except OSError as exc:  # unwritable cache, a library that does not load
                logger.warning("gpt2lab's CPU kernels are unavailable (%s); torch's kernels are used instead", exc)
    finally:
        _loaded = True  # set last: another thread seeing it reads the final _library


def _chosen_isa() -> str:
    """The path :envvar:`GPT2LAB_KERNELS_ISA` asks for, if this CPU runs it, else the CPU's best."""
    runs = build.cpu_isas()
    wanted = os.environ.get(ISA_ENV, "auto").strip().lower()
    if wanted in ("", "auto"):
        return runs[0]
    if wanted not in build.ISA_FLAGS or wanted not in runs:
        logger.warning("%s=%s: this CPU runs %s; using %s", ISA_ENV, wanted, ", ".join(runs), runs[0])
        return runs[0]
    return wanted


def isa() -> str | None:
    """The instruction-set path of the loaded kernels ("avx512", "avx2" or "portable"), None without them."""
    return _ISA_NAMES[_library.gpt2lab_isa()] if available() else None


def available() -> bool:
    """Whether the kernels can run here (built or cached, loaded, not switched off); builds them on the first call."""
    return library() is not None


def has_avx2() -> bool:
    """Whether the built kernels use AVX2/FMA (else a portable path with the same results, slower)."""
    return available() and bool(_library.gpt2lab_has_avx2())


def usable(t: torch.Tensor) -> bool:
    """Whether a tensor can go through the kernels: CPU fp32 outside autograd."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad and available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           scale: torch.Tensor | None = None, in_features: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight * scale[:, None], bias)`` for any number of rows of ``x`` (any leading shape).

    ``weight [out, in]``: contiguous CPU fp32 or bf16, or int8 with ``scale [out]`` (fp32, one per
    output row), or packed int4 (uint8, see :func:`matrix`; ``in_features`` gives ``in``, and ``scale`` is
    checked against it). ``x`` and ``bias`` fp32. Check :func:`usable` first. Each output element is reduced
    in the same order whatever the number of rows (see kernels.c), so a row's result never depends on the
    others. ValueError for an input width or int4 shapes that do not match.
    """
    n_out, n_in = weight.shape
    if weight.dtype == torch.uint8:
        n_in = in_features if in_features is not None else -1
        want = int4_shapes(n_out, n_in)
        if n_in < 0 or (tuple(weight.shape), None if scale is None else tuple(scale.shape)) != want:
            raise ValueError(f"packed int4 weights of {in_features} inputs are uint8 {list(want[0])} with fp32 "
                             f"scales {list(want[1])}, got {list(weight.shape)} and "
                             f"{None if scale is None else list(scale.shape)}")
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight [{n_out}, {n_in}] takes {n_in}")
    x = x.contiguous()
    n_rows = x.numel() // n_in
    y = torch.empty(*x.shape[:-1], n_out)
    if n_rows == 0:
        return y
    view = matrix(weight, bias, scale)
    # int8 and int4 weights: the kernel quantizes x's rows to int16 here (see kernels.c)
    xq, xs = (torch.empty(n_rows, n_in, dtype=torch.int16), torch.empty(n_rows)) if scale is not None else (None, None)
    _library.gpt2lab_linear(x.data_ptr(), ctypes.byref(view), y.data_ptr(), n_rows, n_out, n_in,
                            None if xq is None else xq.data_ptr(), None if xs is None else xs.data_ptr(),
                            torch.get_num_threads())
    return y


def _rows(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``[rows, vocab]`` matrix the sampling kernels can scan."""
    return t.dim() == 2 and t.is_contiguous() and usable(t)


def top_k_(scores: torch.Tensor, ks: list[int]) -> bool:
    """transformers' top-k filter on ``scores [B, V]``, in place: every score below row ``b``'s
    ``ks[b]``-th highest becomes -inf, ties with it stay (``ks[b] == 0``: row left alone, else
    ``1 <= ks[b] <= V``). The same result as ``torch.topk`` then ``masked_fill``, exactly, at a fraction of
    the cost (one pass that rarely looks closer than one comparison per 8 scores).

    Returns False, having changed nothing, when the kernels cannot do it (unavailable, not a contiguous
    CPU fp32 matrix, a NaN in a row): the caller runs the PyTorch code instead.
    """
    if not _rows(scores) or len(ks) != scores.shape[0] or not ks:  # no rows: nothing for the kernels to do
        return False
    rows, vocab = scores.shape
    if not all(0 <= k <= vocab for k in ks):  # the C code reads k scores of a row, and keeps k in its heap
        raise ValueError(f"top-k needs 0 <= k <= {vocab} (the vocabulary) per row, got {ks}")
    heap, thresholds = torch.empty(max(ks)), torch.empty(rows)
    k = (ctypes.c_int64 * rows)(*ks)
    return _library.gpt2lab_top_k_(scores.data_ptr(), rows, vocab, k, heap.data_ptr(), thresholds.data_ptr()) == 0


def row_totals(probs: torch.Tensor) -> torch.Tensor | None:
    """The float64 sum of each row of ``probs [B, V]`` in index order, ``[B]`` (exactly the last column of
    ``probs.cumsum(-1, dtype=torch.float64)``; NaN where a row holds one), or None where the kernels cannot
    scan ``probs`` (see :func:`top_k_`)."""
    if not _rows(probs):
        return None
    totals = torch.empty(probs.shape[0], dtype=torch.float64)
    _library.gpt2lab_row_totals(probs.data_ptr(), probs.shape[0], probs.shape[1], totals.data_ptr())
    return totals


def inverse_cdf(probs: torch.Tensor, targets: list[float]) -> torch.Tensor:
    """Per row of ``probs [B, V]``, the first index whose float64 running sum exceeds ``targets[b]`` (each
    below its row's :func:`row_totals`): exactly ``torch.searchsorted(probs.cumsum(-1, dtype=torch.float64),
    targets[:, None], right=True)[:, 0]``, ``[B]`` int64. Only for ``probs`` that :func:`row_totals` scanned."""
    if not _rows(probs) or len(targets) != probs.shape[0]:  # the C code reads rows * vocab floats, rows targets
        raise ValueError(f"inverse_cdf needs contiguous CPU fp32 probabilities [rows, vocab] and one target per "
                         f"row, got {tuple(probs.shape)} {probs.dtype} and {len(targets)} targets")
    picked = torch.empty(probs.shape[0], dtype=torch.int64)
    _library.gpt2lab_inverse_cdf(probs.data_ptr(), probs.shape[0], probs.shape[1],
                                 (ctypes.c_double * len(targets))(*targets), picked.data_ptr())
    return picked
