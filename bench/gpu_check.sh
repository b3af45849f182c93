#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): bf16 distillation pairs/s and MFU per arm and batch size, the OT
# share of a step, bf16 numerics, query encoding, and search at 1M x 384 -- one JSON, about 4 minutes.
#
#   bench/gpu_check.sh                      # a CUDA machine with the project installed:
#                                           #   make TORCH_SPEC="torch==2.13.0" EXTRAS="dev,gpu" install
#   OUT=/some/dir bench/gpu_check.sh        # writes $OUT/gpu_check.json (default: bench/)
#
# A machine that reaches no package registry gets what it lacks carried in .whl/: wheels (POT,
# faiss-cpu or faiss-gpu) installed with --no-index, and the XLM-R tokenizer as
# .whl/tokenizer/{tokenizer.json.xz,tokenizer_config.json} (the student's weights are random there:
# speed depends on the model's shape only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-true} PYTHONUNBUFFERED=1
args=()
if [ -d .whl ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/optical-ray-site .whl/*.whl
    export PYTHONPATH="/tmp/optical-ray-site:$PYTHONPATH"
  fi
  if [ -f .whl/tokenizer/tokenizer.json.xz ]; then
    mkdir -p /tmp/optical-ray-tokenizer
    xz -dc .whl/tokenizer/tokenizer.json.xz > /tmp/optical-ray-tokenizer/tokenizer.json
    cp .whl/tokenizer/tokenizer_config.json /tmp/optical-ray-tokenizer/
    args+=(--tokenizer /tmp/optical-ray-tokenizer)
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 420 "$PY" bench/gpu_check.py --out "${OUT:-bench}/gpu_check.json" "${args[@]}" "$@"
