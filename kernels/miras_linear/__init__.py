"""Triton kernels for the linear Miras memory, laid out like flash-linear-attention's op folders:

* ``chunk.py`` -- host side of training: :func:`chunk_miras_linear` and the autograd Function of
  the affine retentions (none, decay); ``chunk_mat.py`` the one of lq and kl; ``chunk_launch.py``
  the launches both share; ``chunk_kernels.py`` / ``chunk_mat_kernels.py`` the ``@triton.jit`` code;
  ``chunk_exact.py`` / ``chunk_exact_kernels.py`` the exact delta rule (``chunk_rule="exact"``).
* ``fused_recurrent.py`` -- :func:`fused_recurrent_miras_linear`, token-recurrent decoding
  (forward only).

Whether a call is covered: ``miras_kernels.supports``; the shipped configurations: the linear
section of ``miras_kernels.configs``.
"""

from miras_kernels.miras_linear.chunk import chunk_miras_linear
from miras_kernels.miras_linear.fused_recurrent import fused_recurrent_miras_linear

__all__ = ["chunk_miras_linear", "fused_recurrent_miras_linear"]
