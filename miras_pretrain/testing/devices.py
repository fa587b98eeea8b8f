"""Which device the kernel and operator tests run on, and the tolerances that go with it.

``MIRAS_TEST_DEVICE`` (default ``cpu``) picks it. On ``cpu`` the Triton kernels run in the
interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported), which
computes exact fp32. On ``cuda`` they run compiled, with no interpreter: fp32 ``tl.dot`` is TF32
there unless ``MIRAS_EXACT_FP32=1`` (``miras_kernels.common.precision``) asks for exact fp32, which
the GPU test run sets so that fp32 tolerances mean the same on both.
"""

from __future__ import annotations

import os

import torch

TEST_DEVICE_ENV = "MIRAS_TEST_DEVICE"


def test_device_name() -> str:
    """``"cpu"`` or ``"cuda"`` from ``MIRAS_TEST_DEVICE`` (read without importing torch.cuda)."""
    name = os.environ.get(TEST_DEVICE_ENV, "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{TEST_DEVICE_ENV}={name!r} is not valid: use 'cpu' or 'cuda'")
    return name


def test_device() -> torch.device:
    """The device kernel/operator tests put their tensors on."""
    name = test_device_name()
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{TEST_DEVICE_ENV}=cuda but torch sees no CUDA device: unset it to test on CPU")
    return torch.device(name)


def on_gpu() -> bool:
    return test_device_name() == "cuda"


def fp32_dots_exact() -> bool:
    """True when fp32 kernel dots are exact fp32: always in the interpreter, on a GPU only with
    ``MIRAS_EXACT_FP32=1``. Tests that assume exact fp32 widen their tolerance (TF32 has a 10-bit
    mantissa, ~1e-3 relative per product) when this is False."""
    return not on_gpu() or os.environ.get("MIRAS_EXACT_FP32") == "1"


# pytest collects module-level callables named test_*: these are helpers, not tests
test_device.__test__ = False  # type: ignore[attr-defined]
test_device_name.__test__ = False  # type: ignore[attr-defined]
