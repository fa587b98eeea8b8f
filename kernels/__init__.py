"""The Miras memory operator: one package for every form of it (import name ``miras_kernels``;
the folder is ``kernels/``, mapped in ``pyproject.toml`` because the name ``kernels`` belongs to
Hugging Face's package on the index).

    from miras_kernels import miras_memory, MirasSpec

* :mod:`miras_kernels.spec` -- ``MirasSpec``, the grid point (memory, bias, retention, learner).
* :mod:`miras_kernels.inputs` -- the input contract every backend checks its arguments with.
* :mod:`miras_kernels.pytorch` -- the PyTorch forms: the token loop that defines the semantics
  (``recurrent``) and the chunk-parallel path (``chunked``).
* :mod:`miras_kernels.rules` -- the per-token rules every form shares (inner gradients, reads);
  :mod:`miras_kernels.chunk_step` -- the algebra of one chunk (used by ``chunked`` and by the
  exported Hugging Face model's cached decoding, which copies spec, rules and chunk_step).
* :mod:`miras_kernels.miras_linear`, :mod:`miras_kernels.miras_mlp` -- the Triton kernel families
  (chunk-parallel training and token-recurrent decoding), after flash-linear-attention's layout.
* :mod:`miras_kernels.common` -- jit helpers and varlen bookkeeping shared by the families.
* :mod:`miras_kernels.configs` -- the shipped launch configurations of both kernel families
  (``tools/kernel_report.py`` compiles them).
* :func:`supports` -- whether the Triton kernels cover a call (both families), with the reason when not.
* :func:`causal_depthwise_conv` -- the document-aware short conv in front of q, k, v.
* :class:`VarlenMeta` -- per-batch packed-document metadata (host + device offsets) that lets every
  backend run varlen input without reading device memory on the host.

Importing this package does not import triton; the kernel families do.
"""

from .api import BACKENDS, miras_memory, resolve_backend
from .common.varlen import VarlenMeta
from .conv import causal_depthwise_conv
from .dispatch import supports
from .spec import MirasSpec

__all__ = ["miras_memory", "MirasSpec", "VarlenMeta", "resolve_backend", "BACKENDS", "supports",
           "causal_depthwise_conv"]
