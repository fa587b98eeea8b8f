#!/usr/bin/env bash
# Creates ./.venv with every pinned dependency and the project installed in editable mode.
# Idempotent: a second run only checks what is already there. Order matters: torch is pinned
# first so that nothing later can resolve another build (an unpinned torch range pulls torch +
# CUDA wheels, several GB).
#
#   bash tools/setup_env.sh                 CPU build of torch (constraints.txt); the default
#                                           where nvidia-smi finds no GPU (this machine, CI)
#   bash tools/setup_env.sh --gpu           CUDA build of torch + the Triton it requires
#                                           (constraints-gpu.txt); the default where nvidia-smi
#                                           lists a GPU; works on a login node without one
#   bash tools/setup_env.sh --gpu --cuda-index https://download.pytorch.org/whl/cu126
#                                           the CUDA build from PyTorch's index for an older
#                                           CUDA/driver (PyPI's wheel is CUDA 13.0: driver >= 580)
#   bash tools/setup_env.sh --cpu           force the CPU build
#   bash tools/setup_env.sh [...] --plan    print the mode, pins and torch source; install nothing
# See docs/install_gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=
CUDA_INDEX=
PLAN=0
WHY="default"
usage() { sed -n '7,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) MODE=gpu; WHY="--gpu" ;;
    --cpu) MODE=cpu; WHY="--cpu" ;;
    --plan) PLAN=1 ;;
    --cuda-index) [ $# -ge 2 ] || { echo "setup_env.sh: --cuda-index needs a URL, e.g. https://download.pytorch.org/whl/cu126" >&2; exit 2; }
                  CUDA_INDEX=$2; shift ;;
    --cuda-index=*) CUDA_INDEX=${1#--cuda-index=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup_env.sh: unknown option '$1': use --gpu, --cpu or --cuda-index URL (--help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$MODE" ]; then
  # a machine whose nvidia-smi lists a GPU gets the CUDA build; a login node without GPUs passes --gpu
  # (no `| grep -q`: under pipefail an early grep exit can fail the pipe with SIGPIPE)
  if command -v nvidia-smi >/dev/null 2>&1 && [[ "$(nvidia-smi -L 2>/dev/null || true)" == GPU* ]]; then
    MODE=gpu
    WHY="nvidia-smi lists a GPU; --cpu for the CPU build"
    echo "setup_env.sh: nvidia-smi lists a GPU: CUDA build of torch (--cpu for the CPU build)"
  else
    MODE=cpu
    WHY="no GPU listed by nvidia-smi; --gpu for the CUDA build"
  fi
fi
if [ -n "$CUDA_INDEX" ] && [ "$MODE" != gpu ]; then
  echo "setup_env.sh: --cuda-index is for the CUDA build: add --gpu" >&2; exit 2
fi
CONSTRAINTS=constraints.txt
TORCH_SOURCE=()
if [ "$MODE" = gpu ]; then
  CONSTRAINTS=constraints-gpu.txt
  # the GPU pins are generated from constraints.txt (one list of pins): refuse a stale copy
  "$PY" tools/gen_constraints_gpu.py --check
  # an extra index, not a replacement: its +cuXXX build sorts above PyPI's plain 2.13.0 and the
  # rest still comes from the configured index (a cluster's mirror)
  if [ -n "$CUDA_INDEX" ]; then TORCH_SOURCE=(--extra-index-url "$CUDA_INDEX"); fi
fi
if [ "$PLAN" = 1 ]; then
  echo "mode: $MODE ($WHY)"
  echo "pins: $CONSTRAINTS"
  echo "torch from: the configured index${CUDA_INDEX:+ + $CUDA_INDEX}"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip warns about missing local index folders of this image on every call: keep the log readable.
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check -c $CONSTRAINTS"
export PIP_NO_WARN_SCRIPT_LOCATION=1
# setuptools >= 77 builds the wheel (SPDX license string; tests/test_packaging.py builds without isolation)
$PIP --upgrade pip "setuptools>=77" wheel >/dev/null
$PIP ${TORCH_SOURCE[@]+"${TORCH_SOURCE[@]}"} torch==2.13.0 numpy
$PIP triton
$PIP deepspeed megatron-core wandb sentencepiece "transformers<5" pyarrow pyyaml tqdm \
     matplotlib safetensors pytest pytest-timeout
# mosaicml-streaming hard-requires torchvision, which has no CPU build beside torch 2.13:
# install it without its dependency list and add the pieces it really imports.
$PIP --no-deps mosaicml-streaming
$PIP "xxhash<4" zstd brotli python-snappy catalogue pillow
$PIP lm-eval accelerate peft
# flash-linear-attention's pure-PyTorch references are the tests' external oracles (pure Python;
# its GPU kernels are never imported, see miras_pretrain/testing/fla_reference.py)
$PIP --no-deps fla-core einops
$PIP --no-deps -e .
# "CPU build" / "CUDA build, GPU visible" / "CUDA build, no GPU visible here (login node): fine";
# exits 1 with the cause and the fix for a CPU build in GPU mode or a GPU torch cannot use
.venv/bin/python tools/check_torch_build.py --mode "$MODE"
echo "environment ready: $(pwd)/.venv"
