#!/usr/bin/env bash
# GPU check for ONE GPU (H100/H200), no network, at most 8 minutes.
#
# Runs, in order: the `gpu` tests (tests/test_gpu.py), bf16 train steps of a ~1.1B Llama-style
# model with its MFU, and KV-cached generation tokens/s (bench/bench_gpu_step.py); prints a
# Markdown block to paste into docs/gpu.md. Nothing here is used by the CPU test suite.
#
# The GPU machine has no network, so the Python packages travel as wheels. On a machine with
# network and the same Python version (3.11) and platform:
#
#   pip download -d wheels "megatron-core==0.16.1" einops psutil pyyaml numpy webdataset \
#       math-verify wandb transformers safetensors tokenizers matplotlib rich pillow av \
#       pytest pytest-timeout setuptools
#
# (add torch only if the GPU machine lacks a CUDA build of it: several GB). Copy `wheels/`
# beside this repository, then on the GPU machine:
#
#   bash bench/gpu_check.sh            # WHEELS=wheels PY=python by default
#
# which installs from the folder only (`pip install --no-index --find-links wheels ...`) when
# megatron-core is missing. Override the bench's sizes with BENCH_ARGS="--layers 16 ...".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WHEELS=${WHEELS:-wheels}
start=$(date +%s)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch with CUDA is not importable by $PY; install a CUDA torch build" >&2
  exit 2
fi
if ! "$PY" -c "import megatron.core, copd_mega" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_check: megatron-core/copd_mega missing and no wheel folder $WHEELS/ (see header)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "megatron-core==0.16.1" pytest
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation -e .
fi

echo "== gpu tests"
tests=ok
timeout 240 "$PY" -m pytest -q -m gpu tests/test_gpu.py || tests="FAILED (rc $?)"

echo "== train step and generation"
# shellcheck disable=SC2086
block=$(timeout 200 "$PY" bench/bench_gpu_step.py ${BENCH_ARGS:-} | sed -n '/^### /,$p') ||
  block="| train step and generation | FAILED (see the error above) |"

echo
echo "---- paste into docs/gpu.md (Measurements) ----"
echo "$block"
echo "| gpu tests | $tests |"
echo "| wall time | $(( $(date +%s) - start )) s for bench/gpu_check.sh |"
