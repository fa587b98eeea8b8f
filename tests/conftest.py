"""Test-wide settings. TRITON_INTERPRET must be set before triton is first imported so kernels
run on CPU tensors (the interpreter ignores the device; shapes must stay tiny).

``MIRAS_TEST_DEVICE=cuda`` runs the kernel and operator tests compiled on a GPU instead (no
interpreter, exact fp32 dots unless the caller set ``MIRAS_EXACT_FP32`` itself); see
``miras_pretrain/testing/devices.py``."""

import os

if os.environ.get("MIRAS_TEST_DEVICE", "cpu") == "cuda":
    os.environ.setdefault("MIRAS_EXACT_FP32", "1")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
