"""Building blocks shared by the Miras Triton kernels.

* :mod:`miras_kernels.common.tiles`  -- ``@triton.jit`` helpers used inside kernels: the fp32 ``dot``
  (the only place a kernel may call ``tl.dot``), chunk-local cumulative gates, decay matrices,
  the attentional-bias map ``u = dl/dM`` and its derivative.
* :mod:`miras_kernels.common.varlen` -- host-side helpers for ``cu_seqlens`` (per-document chunk
  offsets) and input validation.
"""
