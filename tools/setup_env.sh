#!/usr/bin/env bash
# Creates ./.venv with every pinned dependency and the project installed in editable mode.
# Idempotent: a second run only checks what is already there. Order matters: torch is pinned
# first so that nothing later can resolve a CUDA build (an unpinned torch range pulls torch +
# CUDA wheels, several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip warns about missing local index folders of this image on every call: keep the log readable.
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt"
export PIP_NO_WARN_SCRIPT_LOCATION=1
# setuptools >= 77 builds the wheel (SPDX license string; tests/test_packaging.py builds without isolation)
$PIP --upgrade pip "setuptools>=77" wheel >/dev/null
$PIP torch==2.13.0 numpy
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
.venv/bin/python -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
echo "environment ready: $(pwd)/.venv"
