"""``gpt2lab info``: where a model reference resolves and what it is."""

from __future__ import annotations

import json

import typer

from .options import Runtime, load_generator, model_option, runtime_options


@runtime_options(threads=False)
def info(
    model: str = model_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    runtime: Runtime = None,
) -> None:
    """Show which checkpoint a model reference loads and its shape."""
    gen = load_generator(model, runtime)
    c = gen.config
    record = {"model": gen.name, "path": str(gen.path), "n_layer": c.n_layer, "n_head": c.n_head,
              "n_embd": c.n_embd, "n_positions": c.n_positions, "vocab_size": c.vocab_size,
              "parameters": gen.model.num_parameters(), "device": str(gen.device),
              # the float dtype the model computes in (wpe stays float when the weights are quantized)
              "dtype": str(gen.model.wpe.weight.dtype).removeprefix("torch."), "quantization": gen.quantization}
    from ..console import echo

    if as_json:
        echo(json.dumps(record))
    else:
        for key, value in record.items():
            echo(f"{key:12} {value}")
