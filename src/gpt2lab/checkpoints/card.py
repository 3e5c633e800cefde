"""Model cards (README.md) for saved folders, written with ``huggingface_hub``'s ``ModelCard``.

The card's YAML header is the Hub's model-card metadata (``base_model``, ``datasets``, ``tags``,
``library_name``, ``pipeline_tag``); the body says how the folder was made, on which data, for how
many steps and with what final validation perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..model import GPT2Config


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub model id (not a local path): the Hub only links those."""
    if not name or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name


def model_card(*, how: str, config: GPT2Config, dtype: torch.dtype | None = None, base_model: str | None = None,
               data: Sequence[str] | None = None, steps: int | None = None, val_loss: float | None = None,
               details: dict[str, object] | None = None) -> str:
    """The text of a README.md model card.

    ``how``: one sentence on how the model was made (e.g. "Fine-tuned with `gpt2lab finetune`.").
    ``base_model``: the model it started from (a Hub id goes into the metadata, a local path only into
    the text). ``data``: training files or dataset names. ``steps``: optimizer steps. ``val_loss``:
    final mean validation loss per token (nats); the card gives its perplexity ``exp(val_loss)``.
    ``details``: more ``name: value`` rows for the table (e.g. learning rate, LoRA rank).
    """
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = _hub_id(base_model)
    meta = ModelCardData(base_model=hub_base, library_name="transformers", pipeline_tag="text-generation",
                         tags=["gpt2", "gpt2lab"])
    base = f"`{base_model}`" if base_model else "none (trained from scratch)"
    rows: list[tuple[str, object]] = [("base model", base)]
    if data:
        rows.append(("training data", ", ".join(f"`{Path(d).name or d}`" for d in data)))
    if steps is not None:
        rows.append(("optimizer steps", steps))
    if val_loss is not None:
        rows.append(("final validation loss", f"{val_loss:.4f} nats/token"))
        rows.append(("final validation perplexity", f"{math.exp(min(val_loss, 50.0)):.2f}"))
    rows.append(("architecture", f"GPT-2, {config.n_layer} layers, {config.n_head} heads, d_model {config.n_embd}, "
                                 f"context {config.n_positions}, vocabulary {config.vocab_size}"))
    if dtype is not None:
        rows.append(("stored dtype", str(dtype).removeprefix("torch.")))
    rows.extend((details or {}).items())
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    title = f"{Path(base_model).name} (gpt2lab)" if base_model else "GPT-2 model (gpt2lab)"
    body = f"""# {title}

{how}

| | |
|---|---|
{table}

## Use

```python
import gpt2lab
gen = gpt2lab.load("path/to/this/folder")
print(gen.generate("Hello", max_new_tokens=40)[0].text)
```

The folder is in Hugging Face layout, so `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load it too.
"""
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}"))
