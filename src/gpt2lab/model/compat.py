"""Calls kept so that old code keeps working."""

from __future__ import annotations

from .gpt2 import GPT2


def optimize_for_inference(model: GPT2, batch_size: int = 1) -> GPT2:
    """Kept for compatibility: a model runs at its fastest without this call (``gpt2lab.runtime`` decides
    how each forward runs, with nothing to switch on).

    Puts ``model`` in eval mode and returns it; on a GPU its parameters also stop requiring gradients.
    ``batch_size`` is validated (an integer >= 1) and otherwise unused. Raises TypeError for anything but
    a :class:`GPT2`, ValueError for a bad ``batch_size``.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"optimize_for_inference expects a gpt2lab GPT2 model, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model.eval()
    if model.wte.weight.device.type == "cuda":
        for p in model.parameters():
            p.requires_grad_(False)
    return model
