"""Triton kernels for the deep (2-layer residual MLP) Miras memory.

Public entries:

* :func:`chunk_miras_mlp` -- chunk-parallel training kernel (forward and backward in Triton).
* :func:`fused_recurrent_miras_mlp` -- token-recurrent kernel for decoding (forward only).
* :func:`supports` -- ``(ok, reason)``: whether a call is covered, else the dispatcher falls back
  to the PyTorch chunked path.
* :func:`aot_specs` -- ``[(kernel, signature, constexprs, config_name), ...]`` for the AOT
  compile report (``num_warps`` is the trailing ``wN`` of the name: :func:`aot_num_warps`;
  compile with ``num_stages=1``: :data:`NUM_STAGES`).
"""

from .aot import SPILL_BUDGET, aot_num_warps, aot_specs, compile_entry, spill_budget
from .api import NUM_STAGES, chunk_miras_mlp, supports
from .fused_recurrent import fused_recurrent_miras_mlp

__all__ = ["chunk_miras_mlp", "fused_recurrent_miras_mlp", "supports", "aot_specs", "aot_num_warps",
           "compile_entry", "NUM_STAGES", "SPILL_BUDGET", "spill_budget"]
