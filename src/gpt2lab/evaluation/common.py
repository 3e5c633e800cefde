"""Helpers shared by the evaluation modules: model arguments and progress bars."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from ..generation import Generator

ModelLike = Union["Generator", str, Path, None]


def as_generator(model: ModelLike, device: str = "auto", quantization: str | None = None) -> Generator:
    """A loaded :class:`Generator` for a Generator (used as is), a model reference, or None (the default model).

    ``quantization`` (``None``, ``"int8"``, ``"int4"``, ``"bf16"``) applies to a model loaded here; a Generator
    passed in keeps its own (ValueError if it asks for another).
    """
    from ..generation import Generator, load
    from ..placement import check_quantization

    quantization = check_quantization(quantization)
    if isinstance(model, Generator):
        if quantization is not None and model.quantization != quantization:
            raise ValueError(f"quantization={quantization!r} cannot apply to an already loaded Generator "
                             f"(its quantization is {model.quantization!r}); pass the model's name or path instead")
        return model
    return load(model, device=device, quantization=quantization)


def progress_bar(total: int, description: str, enabled: bool):  # noqa: ANN201 - console's context manager
    """A progress bar on stderr (removed when done); yields ``advance(n)``. A no-op when disabled
    (:func:`gpt2lab.console.progress_bar`)."""
    from ..console import progress_bar as bar

    return bar(total, description, enabled)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats (not JSON) replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
