"""Moved: the device/dtype vocabulary is :mod:`gpt2lab.placement` (a foundation module every layer may import).

These names stay importable from here for code written against the old path; nothing is decided here.
"""

from ..placement import (
                         DEVICE_CHOICES,
                         DTYPES,
                         MAX_THREADS,
                         autocast_dtype,
                         bf16_supported,
                         check_threads,
                         resolve_device,
                         resolve_dtype,
                         set_threads,
)

__all__ = ["DEVICE_CHOICES", "DTYPES", "MAX_THREADS", "autocast_dtype", "bf16_supported", "check_threads",
           "resolve_device", "resolve_dtype", "set_threads"]
