"""Where a model runs and in which precision: the one place that turns ``device=``/``dtype=`` into torch's.

``device="auto"`` is the first CUDA GPU when torch sees one, else the CPU. ``dtype="auto"`` is bfloat16
on a CUDA GPU that supports it (Ampere and newer: ``torch.cuda.is_bf16_supported()``; half the memory
traffic of float32, the same exponent range, so GPT-2 needs no loss scaling), float32 everywhere else
(CPUs and older GPUs, where bfloat16 is emulated and slower than float32).
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
# torch accepts any count but crashes (SIGSEGV, no message) creating ~100k threads; llama.cpp's cap is 512
MAX_THREADS = 1024


def check_threads(threads: int, name: str = "threads") -> int:
    """``threads``, or ``ValueError`` naming ``name`` unless it is an integer in [1, MAX_THREADS]."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"{name} must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return threads


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


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> ``cuda`` when available else ``cpu``; ``"cuda"``/``"cuda:N"``/``"cpu"``/``"mps"`` checked.

    Raises ``ValueError`` naming the choices for an unknown spelling, and when the device asked for is
    not there (no CUDA build or GPU, an index beyond ``torch.cuda.device_count()``, no MPS).
    """
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not _DEVICE.match(spec):
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: no CUDA GPU is available to torch here (torch.cuda.is_available() "
                             f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {spec!r}: MPS is not available here; use cpu")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 runs natively on ``device`` (CUDA compute capability 8.0 and newer)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no including_emulation and answers for native support
            return torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None -> bfloat16 on a CUDA GPU with native bf16, else float32; names checked.

    Raises ``ValueError`` for an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype}")
        return dtype
    name = "auto" if dtype is None else _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def autocast_dtype(dtype: str | None, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for ``--dtype``: None means plain float32 (no autocast).

    ``auto``: bfloat16 on a CUDA GPU with native bf16, float32 elsewhere. float16 autocast is for CUDA
    (it needs a gradient scaler, see the trainer); on the CPU it is refused.
    """
    resolved = resolve_dtype(dtype, device)
    if resolved == torch.float16 and device.type != "cuda":
        raise ValueError("--dtype float16 trains on CUDA only (it needs loss scaling and fast fp16 kernels); "
                         "use bfloat16 or float32 on this device")
    return None if resolved == torch.float32 else resolved
