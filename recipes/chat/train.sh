#!/usr/bin/env bash
# Turn the bundled Shakespeare model into a small chat model, in minutes on a CPU:
#   bash recipes/chat/train.sh [OUT_DIR]
# 1. fine-tune shakespeare-gpt2 on the self-written conversations (loss on the assistant's turns only;
#    the model is saved with its chat template);
# 2. write the model card with the run's figures and an example conversation.
# Then: gpt2lab chat --model OUT_DIR   (or gpt2lab serve --model OUT_DIR)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/work/shakespeare-chat}"

gpt2lab finetune "$here/conversations.jsonl" --model shakespeare-gpt2 --format chat \
  --batch-size 16 --max-steps 300 --lr 1e-3 --warmup-steps 20 --val-share 0.1 \
  --eval-every 50 --eval-blocks 60 --seed 0 --threads 2 --out "$out"

python "$here/model_card.py" "$out"
