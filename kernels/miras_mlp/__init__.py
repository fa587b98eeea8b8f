"""Triton kernels for the deep (2-layer residual MLP) Miras memory, laid out like
flash-linear-attention's op folders:

* ``chunk.py`` -- host side of training: :func:`chunk_miras_mlp` and its autograd Function;
  ``chunk_kernels.py`` (the ``@triton.jit`` phase kernels), ``chunk_lq_kernels.py`` (the lq
  retention's extra phases), ``chunk_kl_kernels.py`` (the kl retention's phases).
* ``fused_recurrent.py`` -- :func:`fused_recurrent_miras_mlp`, token-recurrent decoding (forward only).
* ``aot.py`` -- :func:`aot_specs` ``[(kernel, signature, constexprs, config_name), ...]`` for the AOT
  compile report (``num_warps`` is the trailing ``wN`` of the name: :func:`aot_num_warps`).

Whether a call is covered: ``miras_kernels.supports``; the shipped configurations: the MLP section
of ``miras_kernels.configs``.
"""

from .aot import SPILL_BUDGET, aot_num_warps, aot_specs, compile_entry, spill_budget
from .chunk import chunk_miras_mlp
from .fused_recurrent import fused_recurrent_miras_mlp

__all__ = ["chunk_miras_mlp", "fused_recurrent_miras_mlp", "aot_specs", "aot_num_warps", "compile_entry",
           "SPILL_BUDGET", "spill_budget"]
