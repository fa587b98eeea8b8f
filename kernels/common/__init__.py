"""Building blocks shared by the Miras Triton kernel families (public names only: no module
imports another module's private helper).

* :mod:`miras_kernels.common.codes` -- the constexpr codes of bias and retention (plain Python).
* :mod:`miras_kernels.common.tiles` -- ``@triton.jit`` helpers of every kernel: the fp32 ``dot``
  (the only place a linear-family kernel may call ``tl.dot``), chunk-local cumulative gates, decay matrices,
  the attentional-bias map ``u = dl/dM`` of the linear memory and its derivative.
* :mod:`miras_kernels.common.linear_blocks` -- ``@triton.jit`` loads/stores, chunk bookkeeping,
  chunk coefficients and shared adjoint pieces of the linear family's chunk kernels.
* :mod:`miras_kernels.common.mlp_tiles` -- ``@triton.jit`` maths of the MLP memory (gelu, layer
  norm, bias map, lq norms, online softmax) shared by its chunk and decoding kernels.
* :mod:`miras_kernels.common.mlp_scratch` -- the MLP chunk kernels' per-program scratch layout
  and its addressing helpers.
* :mod:`miras_kernels.common.varlen` -- host-side chunk bookkeeping for ``cu_seqlens``.
* :mod:`miras_kernels.common.fresh` -- fresh kernel buffers, NaN-filled under ``MIRAS_NAN_EMPTY=1``.
* :mod:`miras_kernels.common.launch_spec` -- the argument specialisation of a Triton launch, for AOT compiles.
"""
