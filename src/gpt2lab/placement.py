"""Where a model runs and in which precision: the one vocabulary of device, dtype and quantization names.

Every front end (``gpt2lab.load``, ``checkpoints.load_model``, the CLI, the server, training) turns its
``device=``/``dtype=``/``quantization=`` into torch's here, so a name means the same everywhere and a wrong
one gets the same error, naming the parameter (``dtype``, ``--dtype``, ...) and the allowed values. A
foundation module: it imports torch and the standard library only, and every layer may import it.

- ``device``: ``"auto"`` (or None) is the first CUDA GPU when torch sees one, else the CPU; ``"cpu"``,
  ``"cuda"``, ``"cuda:N"``, ``"mps"``.
- ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"`` (aliases ``fp32``, ``bf16``, ``fp16``, ``half``;
  any case) or a ``torch.dtype``. ``None`` and ``"auto"`` are decided by the caller's layer, as in
  transformers: :func:`resolve_dtype` gives the device's default, bfloat16 on a CUDA GPU that supports it
  (Ampere and newer: half the memory traffic of float32, the same exponent range, so GPT-2 needs no loss
  scaling), float32 everywhere else (CPUs and older GPUs, where bfloat16 is emulated and slower than
  float32); ``"auto"`` with a stored dtype keeps a half-precision checkpoint's own.
- ``quantization`` (weight-only, vLLM's option name): ``None`` (weights as stored), ``"int8"`` (int8 weights,
  per-output-channel scales), ``"int4"`` (4-bit weights, one scale per group of 128 inputs) or ``"bf16"``
  (16-bit weight storage, float32 arithmetic). ``"bf16"`` is also a dtype alias: as a *dtype* it makes every
  tensor and all arithmetic bfloat16; as a *quantization* only the linear weights are stored in bfloat16. To
  add a quantization, add its name to :data:`QUANTIZATIONS` (and its modules to ``gpt2lab.model.quantize``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Literal

import torch

# -- dtypes --------------------------------------------------------------------------------------
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DTYPE_CHOICES = ("auto", *DTYPES)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# what a checkpoint's config.json may say it is stored in (torch_dtype): a float64 file is read (and
# converted), though no front end computes in float64
STORED_DTYPES: dict[str, torch.dtype] = {**DTYPES, "float64": torch.float64}

# -- quantizations -------------------------------------------------------------------------------
QUANTIZATIONS = ("int8", "bf16", "int4")

# -- devices and threads -------------------------------------------------------------------------
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# torch accepts any count but crashes (SIGSEGV, no message) creating ~100k threads; llama.cpp's cap is 512
MAX_THREADS = 1024


def dtype_name(dtype: str | torch.dtype, name: str = "dtype", *, auto: bool = True) -> str:
    """The canonical name of a dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, and ``"auto"`` when
    ``auto`` allows it).

    Aliases (``bf16``, ``fp16``, ``half``, ``fp32``) and any case are accepted. Raises ``ValueError`` naming
    ``name`` (the caller's parameter: ``dtype``, ``--dtype``, ...) and the choices for anything else.
    """
    choices = DTYPE_CHOICES if auto else tuple(DTYPES)
    if isinstance(dtype, torch.dtype):
        for key, value in DTYPES.items():
            if value == dtype:
                return key
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {dtype}")
    spelled = dtype.strip().lower() if isinstance(dtype, str) else None
    canonical = DTYPE_ALIASES.get(spelled, spelled) if spelled is not None else None
    if canonical not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} (or {', '.join(DTYPE_ALIASES)}), "
                         f"got {dtype!r}")
    return canonical


def parse_dtype(dtype: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | Literal["auto"] | None:
    """``dtype`` checked and spelled as torch's: a ``torch.dtype``, or ``"auto"``/``None`` left for the caller.

    Raises ``ValueError`` naming ``name`` and the choices for an unknown name or dtype.
    """
    if dtype is None:
        return None
    canonical = dtype_name(dtype, name)
    return "auto" if canonical == "auto" else DTYPES[canonical]


def storage_dtype(dtype: str | torch.dtype | None, stored: Callable[[], torch.dtype],
                  name: str = "dtype") -> torch.dtype | None:
    """The dtype to hold or write a checkpoint's tensors in, as transformers' ``torch_dtype``: ``None`` stays
    None (the caller's default: float32 when loading, the model's own when saving), ``"auto"`` is
    ``stored()`` (the checkpoint's own dtype, read only when asked for), a name its dtype; a ``torch.dtype``
    is taken as given (float64 included).

    Raises ``ValueError`` naming ``name`` and the choices for an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    parsed = parse_dtype(dtype, name)
    return stored() if parsed == "auto" else parsed


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 runs natively on ``device`` (CUDA compute capability 8.0 and newer)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no including_emulation and answers for native support
            return torch.cuda.is_bf16_supported()


def default_dtype(device: torch.device) -> torch.dtype:
    """The device's default: bfloat16 on a CUDA GPU with native bf16, float32 elsewhere."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, *,
                  stored: torch.dtype | Callable[[], torch.dtype] | None = None, name: str = "dtype") -> torch.dtype:
    """The dtype a model runs in on ``device``: ``None`` -> the device's default (:func:`default_dtype`);
    ``"auto"`` -> ``stored`` (the checkpoint's own dtype, or a function reading it, called only for
    ``"auto"``) when it is float16/bfloat16, else the device's default, as transformers'
    ``torch_dtype="auto"``; a name or ``torch.dtype`` -> that dtype.

    Raises ``ValueError`` naming ``name`` and the choices for an unknown name.
    """
    parsed = parse_dtype(dtype, name)
    if parsed == "auto":
        own = stored() if callable(stored) else stored
        return own if own in HALF_DTYPES else default_dtype(device)
    return default_dtype(device) if parsed is None else parsed


def autocast_dtype(dtype: str | None, device: torch.device, name: str = "--dtype") -> torch.dtype | None:
    """The training autocast dtype: None means plain float32 (no autocast).

    ``auto``/None: bfloat16 on a CUDA GPU with native bf16, float32 elsewhere. float16 autocast is for CUDA
    (it needs a gradient scaler, see the trainer); on another device it raises ``ValueError``.
    """
    resolved = resolve_dtype(dtype, device, name=name)
    if resolved == torch.float16 and device.type != "cuda":
        raise ValueError(f"{name} float16 trains on CUDA only (it needs loss scaling and fast fp16 kernels); "
                         "use bfloat16 or float32 on this device")
    return None if resolved == torch.float32 else resolved


def check_quantization(quantization: str | None, name: str = "quantization") -> str | None:
    """``quantization`` normalised (``None``, ``"int8"``, ``"bf16"`` or ``"int4"``); ``ValueError`` naming ``name``
    and the choices for anything else."""
    if quantization is None:
        return None
    if not isinstance(quantization, str) or quantization.strip().lower() not in QUANTIZATIONS:
        raise ValueError(f"{name} must be None or one of {', '.join(repr(q) for q in QUANTIZATIONS)}, "
                         f"got {quantization!r}")
    return quantization.strip().lower()


def device_name(device: str | torch.device | None, name: str = "device") -> str:
    """``device`` checked for spelling only (not whether it is there): ``"auto"``, ``"cpu"``, ``"mps"``,
    ``"cuda"`` or ``"cuda:N"``, lower-cased; None is ``"auto"``. ``ValueError`` naming ``name`` otherwise."""
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = "auto" if device is None else str(device).strip().lower()
    if not _DEVICE.match(spec):
        raise ValueError(f"{name} must be one of {DEVICE_CHOICES}, got {device!r}")
    return spec


def resolve_device(device: str | torch.device | None = "auto", name: str = "device") -> torch.device:
    """``"auto"``/None -> ``cuda`` when available else ``cpu``; ``"cuda"``/``"cuda:N"``/``"cpu"``/``"mps"`` checked.

    Raises ``ValueError`` naming ``name`` and the choices for an unknown spelling, and when the device asked
    for is not there (no CUDA build or GPU, an index beyond ``torch.cuda.device_count()``, no MPS).
    """
    spec = device_name(device, name)
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {spec!r}: no CUDA GPU is available to torch here (torch.cuda.is_available() "
                             f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {spec!r}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name} {spec!r}: MPS is not available here; use cpu")
    return dev


def check_threads(threads: int, name: str = "threads") -> int:
    """``threads``, or ``ValueError`` naming ``name`` unless it is an integer in [1, MAX_THREADS]."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"{name} must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return threads


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block and put back after (process-wide, as
    ``torch.set_num_threads`` is: for short stretches of a loader's own work, not around a caller's)."""
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(threads: int, name: str = "threads") -> None:
    """Set torch's intra-op (and, while still settable, inter-op) CPU thread count.

    Raises ``ValueError`` naming ``name`` unless ``threads`` is an integer in [1, MAX_THREADS].
    """
    check_threads(threads, name)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before the first inter-op parallel work; the intra-op count matters
        pass
