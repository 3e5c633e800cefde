"""Write the model card (README.md) of a chat model made by recipes/chat/train.sh.

    python recipes/chat/model_card.py MODEL_DIR

Records the run (base model, data, steps, validation loss and perplexity on the assistant's tokens),
the chat template it was trained and saved with, and an example conversation (greedy replies).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import gpt2lab
from gpt2lab.apps.chat import ChatSession
from gpt2lab.sampling import SamplingParams

QUESTIONS = ["Hello!", "Who is Hamlet?", "Give me some advice.", "Recommend a comedy.", "Thank you."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    args = parser.parse_args()
    info = json.loads((args.model / "training.json").read_text())
    evals = [json.loads(line) for line in (args.model / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    session = ChatSession(gpt2lab.load(args.model), params=SamplingParams(temperature=0, max_new_tokens=40))
    lines = []
    for question in QUESTIONS:
        lines += [f"User: {question}", f"Bot: {session.reply(question)}"]
    chat = "\n".join(lines)
    settings = info["settings"]
    card = f"""---
license: mit
base_model: shakespeare-gpt2 (bundled with gpt2lab)
tags: [gpt2, gpt2lab, chat]
---
# shakespeare-chat

The bundled 12M-parameter Shakespeare GPT-2 fine-tuned into a small chat model on
`recipes/chat/conversations.jsonl` ({info['train_conversations']} training and {info['val_conversations']}
validation conversations, self-written, public domain) with `bash recipes/chat/train.sh`.

- Loss on the assistant's tokens only (`--assistant-only-loss`); {info['max_steps']} steps of
  {info['global_batch']} conversations, learning rate {info['lr']}, seed {settings['seed']}.
- Best validation loss on the assistant's tokens: {best['val_loss']:.4f} (perplexity
  {math.exp(best['val_loss']):.2f}) at step {best['step']}, from {evals[0]['val_loss']:.4f} before fine-tuning.
  The validation conversations reuse the same hand-written exchanges in other combinations, so this
  measures how well the model learned them, not how it answers new questions.
- Layout: gpt2lab's transcript chat template (`User: ...` / `Bot: ...` lines after a persona paragraph),
  saved in `tokenizer_config.json` as `chat_template`, so `gpt2lab chat`, `gpt2lab serve`'s
  `/v1/chat/completions` and transformers' `apply_chat_template` lay a conversation out the same way.

## Example conversation (greedy, `gpt2lab chat --model THIS_DIR --temperature 0`)

```
{chat}
```

It is a 12M-parameter model that has seen a few hundred short conversations: it answers the questions
it was taught, and improvises (often nonsense) outside them.
"""
    (args.model / "README.md").write_text(card, encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
