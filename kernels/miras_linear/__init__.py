"""Linear-memory Miras kernels: chunk-parallel training path and token-recurrent decoding."""

from miras_kernels.miras_linear.chunk import chunk_miras_linear
from miras_kernels.miras_linear.fused_recurrent import fused_recurrent_miras_linear

__all__ = ["chunk_miras_linear", "fused_recurrent_miras_linear"]
