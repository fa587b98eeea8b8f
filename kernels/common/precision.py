"""Which precision a kernel's fp32 ``tl.dot`` uses.

On sm_80/sm_90 an fp32 ``tl.dot`` compiles to TF32 tensor-core instructions (10-bit mantissa)
unless ``input_precision="ieee"`` is asked for; the interpreter always computes exact fp32. Training
wants TF32 (8x the fp32 throughput); the fp32 numerics tests on a GPU want exact fp32, so that
their tolerances mean the same thing on a GPU as in the interpreter.

Every kernel takes a ``DOT_PRECISION: tl.constexpr`` and passes it to each ``tl.dot``; hosts fill
it with :func:`dot_precision`. It only affects fp32 operands (bf16/fp16 dots are exact products
accumulated in fp32 either way).
"""

from __future__ import annotations

import os

# MIRAS_EXACT_FP32=1 asks every kernel for exact fp32 dots (the GPU test suite sets it).
EXACT_FP32_ENV = "MIRAS_EXACT_FP32"


def dot_precision() -> str:
    """``"ieee"`` when ``MIRAS_EXACT_FP32=1`` is set, else ``"tf32"`` (the training default)."""
    return "ieee" if os.environ.get(EXACT_FP32_ENV) == "1" else "tf32"
