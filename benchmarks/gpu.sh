#!/usr/bin/env bash
# gpt2lab on a GPU, one run: install, the CUDA tests, then one table against transformers (benchmarks/gpu.py).
#
#   bash benchmarks/gpu.sh            # from the repository root on the GPU machine; about 5-7 minutes
#
# The machine's Python must have torch (CUDA build), transformers, tokenizers, safetensors and
# huggingface_hub. Everything else (benchmarks/gpu-requirements.txt) comes from benchmarks/wheels/ when
# that folder exists (no network needed: make it with the pip download line in gpu-requirements.txt),
# else from the package index. Environment: PYTHON (default python), GPT2LAB_WHEELS (default
# benchmarks/wheels), GPU_BENCH_JSON (where the table also goes as JSON, default gpu-results.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${GPT2LAB_WHEELS:-benchmarks/wheels}
OUT_JSON=${GPU_BENCH_JSON:-gpu-results.json}
start=$(date +%s)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

echo "== install" >&2
"$PY" -c "import torch, transformers, tokenizers, safetensors, huggingface_hub; \
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
torch.cuda.get_device_name(0))" >&2
if [ -d "$WHEELS" ]; then
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -r benchmarks/gpu-requirements.txt
else
  "$PY" -m pip install --quiet -r benchmarks/gpu-requirements.txt
fi
# the project itself, without touching the machine's torch/transformers (PYTHONPATH covers a failed install)
"$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
  || echo "gpt2lab: editable install failed; running from src/ via PYTHONPATH" >&2

echo "== CUDA tests" >&2
tests_rc=0
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py -k "cuda or bucket or resolution" \
  || tests_rc=$?

echo "== benchmark" >&2
bench_rc=0
timeout 330 "$PY" benchmarks/gpu.py --json "$OUT_JSON" || bench_rc=$?

echo "gpu.sh: CUDA tests rc=$tests_rc, benchmark rc=$bench_rc (1 = a bar missed), $(( $(date +%s) - start )) s in all" >&2
exit $(( tests_rc != 0 || bench_rc != 0 ))
