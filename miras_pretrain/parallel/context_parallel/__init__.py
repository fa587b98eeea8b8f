"""Context (sequence) parallelism: one sequence split into contiguous slices over a CP group.

Modules, each depending only on the ones above it (docs/context_parallel.md):

* :mod:`.rules` -- the one validator of CP's rules (lengths, scheme vs memory, halos).
* :mod:`.layout` -- :class:`CPSlice` and :func:`slice_batch_for_cp`, the trainer's slicing helper.
* :mod:`.group` -- :class:`CPGroup` (ranks and process groups) and the training loop's collectives.
* :mod:`.comm` -- differentiable halo exchange, state passing and all-gather.
* :mod:`.memory`, :mod:`.attention` -- the Miras mixer's conv and memory, softmax attention.
* :mod:`.context` -- :class:`ContextParallel` (per process) and :class:`CPContext` (per batch,
  passed to the model's forward as ``cp=``).

Nothing here imports the model, megatron or DeepSpeed at import time.
"""

from .comm import CPStats
from .context import ContextParallel, CPContext
from .group import CPGroup, all_reduce_cp_grads, cp_loss_reduce
from .layout import CPSlice, Segment, slice_batch_for_cp
from .rules import SCHEMES, FieldNames, validate_cp_model

__all__ = [
    "SCHEMES", "FieldNames", "validate_cp_model",
    "CPSlice", "Segment", "slice_batch_for_cp",
    "CPGroup", "all_reduce_cp_grads", "cp_loss_reduce",
    "CPStats", "ContextParallel", "CPContext",
]
