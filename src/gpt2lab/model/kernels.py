"""gpt2lab's own CPU kernels for decoding (``kernels.c``), built on first use and called via ctypes.

A decode step reads every weight once for a few rows, so its speed is the speed at which the weights
stream from memory (one row) or from cache (a few rows). ``linear`` streams one row's weights at about
the rate of a plain ``sum()``, where oneDNN's and MKL's one-row GEMV reach 60-80% of it on AVX2 CPUs,
and reuses each weight load for two rows when there are several; ``gpt2lab_decode`` (driven by
``fast.Decoder``) runs a whole decode step, embedding to logits, in one call. Measured by
``benchmarks/generate.py``.

The C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``; ``-O3 -march=native -fopenmp``) into ``$XDG_CACHE_HOME/gpt2lab/kernels/`` (about half a
second) and shares torch's OpenMP runtime. Without a compiler, on a failed build (remembered next to
where the library would be, with the compiler's message, and not retried with the same compiler),
or with ``GPT2LAB_CPU_KERNELS=0``, :func:`available` is False and the model uses torch's kernels:
same results, slower decoding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: the compiler fuses no multiply-add on its own, so every fused one is written out
# and the arithmetic of a row is the same in every code path (batch invariance, see kernels.c)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11")
DISABLE_ENV = "GPT2LAB_CPU_KERNELS"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


KIND_F32, KIND_INT8, KIND_BF16 = 0, 1, 2
_KINDS = {torch.float32: KIND_F32, torch.int8: KIND_INT8, torch.bfloat16: KIND_BF16}
WEIGHT_DTYPES = tuple(_KINDS)  # the weight dtypes the kernels read
# GPT2Config.activation_function -> the kernels' epilogue number (kernels.c), for every activation gpt2.py knows
ACTIVATIONS = {"gelu_new": 2, "gelu_pytorch_tanh": 2, "gelu_fast": 2, "gelu": 3, "relu": 4, "silu": 5, "swish": 5}


class Matrix(ctypes.Structure):
    """``gpt2lab_matrix``: a ``[out, in]`` weight, fp32, bf16, or int8 with one fp32 scale per output
    row, and an optional bias."""

    _fields_ = [("w", _ptr), ("scale", _ptr), ("bias", _ptr), ("kind", _i64)]

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> Matrix:
        """The pointers of contiguous CPU tensors (the caller keeps them alive)."""
        return cls(weight.data_ptr(), None if scale is None else scale.data_ptr(),
                   None if bias is None else bias.data_ptr(), _KINDS[weight.dtype])


class LoRAPair(ctypes.Structure):
    """``gpt2lab_lora_pair``: one adapter's ``A [rank, in]`` and ``B [out, rank]`` (fp32) for one projection
    (``a`` NULL: not adapted), its rank and scale."""

    _fields_ = [("a", _ptr), ("b", _ptr), ("rank", _i64), ("scale", ctypes.c_float)]


class LoRATable(ctypes.Structure):
    """``gpt2lab_lora``: each token's adapter slot, the ``[slots][n_layer][4]`` pairs, scratch of
    ``n_tok * max_rank`` floats."""

    _fields_ = [("token_slot", _ptr), ("pairs", _ptr), ("tmp", _ptr), ("max_rank", _i64)]


class Layer(ctypes.Structure):
    """``gpt2lab_layer``: one block's weights and its KV cache, as pointers."""

    _fields_ = [("ln_1_w", _ptr), ("ln_1_b", _ptr), ("attn", Matrix), ("attn_proj", Matrix),
                ("ln_2_w", _ptr), ("ln_2_b", _ptr), ("fc", Matrix), ("mlp_proj", Matrix),
                ("k_cache", _ptr), ("v_cache", _ptr), ("attn_scale", ctypes.c_float)]


_c_int = ctypes.c_int
_SIGNATURES = {  # name: (argument types, return type)
    "gpt2lab_linear": ([_ptr, ctypes.POINTER(Matrix), _ptr, _i64, _i64, _i64, _ptr, _ptr, _c_int], None),
    "gpt2lab_forward": ([ctypes.POINTER(Layer), _i64, ctypes.POINTER(Matrix), _ptr, _ptr, _ptr,
                         ctypes.POINTER(Matrix), _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64,
                         ctypes.c_float, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _c_int, _ptr], _c_int),
    "gpt2lab_top_k_": ([_ptr, _i64, _i64, _ptr, _ptr, _ptr], _c_int),
    "gpt2lab_row_totals": ([_ptr, _i64, _i64, _ptr], None),
    "gpt2lab_inverse_cdf": ([_ptr, _i64, _i64, _ptr, _ptr], None),
    "gpt2lab_has_avx2": ([], _c_int),
}
_library: ctypes.CDLL | None = None
_loaded = False
_load_lock = threading.Lock()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2lab" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build_key(compiler: str) -> str:
    """Source, flags, compiler and CPU: ``-march=native`` code must not run on another CPU sharing a home."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((compiler, str(os.stat(compiler).st_mtime_ns), *FLAGS, platform.machine())).encode())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        cpu = sorted({line for line in cpuinfo if line.startswith(("flags", "model name"))})
        digest.update("\n".join(cpu).encode())
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:16]


def _build() -> Path | None:
    """The compiled library's path (compiled now unless cached), or None where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        logger.debug("no C compiler found: gpt2lab's CPU kernels are off")
        return None
    target = cache_dir() / f"gpt2lab_kernels_{_build_key(compiler)}.so"
    failed = target.with_suffix(".failed")  # this compiler could not build this source: do not retry
    if target.is_file():
        return target
    if failed.is_file():
        logger.info("gpt2lab's CPU kernels are off: building them failed before (%s)", failed)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temporary name and rename: concurrent processes never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            failed.write_text(f"{compiler} {' '.join(FLAGS)}\n{result.stderr}", encoding="utf-8")
            logger.warning("building gpt2lab's CPU kernels failed (torch's kernels are used instead; the "
                           "reason is kept in %s):\n%s", failed, result.stderr.strip())
            return None
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
                path = _build()
                if path is not None:
                    lib = ctypes.CDLL(str(path))
                    for name, (argtypes, restype) in _SIGNATURES.items():
                        getattr(lib, name).argtypes = argtypes
                        getattr(lib, name).restype = restype
                    if not lib.gpt2lab_has_avx2():
                        logger.warning("gpt2lab's CPU kernels were built without AVX2/FMA (this CPU or compiler "
                                       "lacks them): results are the same, decoding is several times slower")
                    _library = lib
            except OSError as exc:  # unwritable cache, a library that does not load
                logger.warning("gpt2lab's CPU kernels are unavailable (%s); torch's kernels are used instead", exc)
    finally:
        _loaded = True  # set last: another thread seeing it reads the final _library


def available() -> bool:
    return library() is not None


def has_avx2() -> bool:
    """Whether the built kernels use AVX2/FMA (else a portable path with the same results, slower)."""
    return available() and bool(_library.gpt2lab_has_avx2())


def usable(t: torch.Tensor) -> bool:
    """Whether a tensor can go through the kernels: CPU fp32 outside autograd."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad and available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * scale[:, None], bias)`` for any number of rows of ``x`` (any leading shape).

    ``weight [out, in]``: contiguous CPU fp32 or bf16, or int8 with ``scale [out]`` (fp32, one per
    output row). ``x`` and ``bias`` fp32. Check :func:`usable` first. Each output element is reduced in the
    same order whatever the number of rows (see kernels.c), so a row's result never depends on the
    others.
    """
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight [{n_out}, {n_in}] takes {n_in}")
    x = x.contiguous()
    n_rows = x.numel() // n_in
    y = torch.empty(*x.shape[:-1], n_out)
    if n_rows == 0:
        return y
    matrix = Matrix.of(weight, bias, scale)
    # int8 weights: the kernel quantizes x's rows to int16 here (see kernels.c)
    xq, xs = (torch.empty(n_rows, n_in, dtype=torch.int16), torch.empty(n_rows)) if scale is not None else (None, None)
    _library.gpt2lab_linear(x.data_ptr(), ctypes.byref(matrix), y.data_ptr(), n_rows, n_out, n_in,
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
