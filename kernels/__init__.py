"""Triton kernels for the Miras operators (layout after flash-linear-attention: one folder per
operator family).

* :mod:`kernels.miras_linear` -- linear memory: ``chunk_miras_linear`` (training, forward and
  backward) and ``fused_recurrent_miras_linear`` (decoding).
* :mod:`kernels.common` -- jit helpers (fp32 dots, chunk cumulative gates, bias maps) and
  varlen bookkeeping.
* :mod:`kernels.configs` -- the shipped launch configurations (checked by tools/kernel_report.py).
* :func:`supports` -- whether a call can run on the kernels, with the reason when it cannot.

Importing this package does not import triton; :mod:`kernels.miras_linear` does.
"""

from kernels.dispatch import supports

__all__ = ["supports"]
