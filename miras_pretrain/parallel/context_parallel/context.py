"""The context-parallel runtime of one process and the per-batch context the model receives.

:class:`ContextParallel` holds the group, the scheme and the communication state for the whole
run. ``with cp.batch(layout) as ctx:`` binds it to one batch's :class:`CPSlice` and yields the
:class:`CPContext` that is passed to the model's forward (``model(..., cp=ctx)``); the layers
call its ``miras_layer`` / ``positions`` / ``attention``, which do the halo exchanges and the
memory-state passing. Backward may run after the block: the autograd nodes keep what they need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .attention import cp_attention
from .comm import CPTransport
from .group import CPGroup
from .layout import CPSlice
from .memory import MirasLayerCP
from .rules import check_scheme, resolve_scheme


class ContextParallel(CPTransport):
    """Per-process CP runtime: group, scheme, message tags, pending sends and timers.

    ``scheme``: ``"auto"`` (all-gather for affine memories -- ``spec.is_affine`` -- state passing
    for the rest), ``"state_passing"`` (every layer) or ``"all_gather"`` (affine layers only; a
    non-affine layer is an error). ``active`` is the context of the batch being run (None
    outside :meth:`batch`)."""

    def __init__(self, group: CPGroup, scheme: str = "auto") -> None:
        check_scheme(scheme)
        super().__init__(group)
        self.scheme = scheme
        self.active: CPContext | None = None

    def scheme_for(self, spec) -> str:
        """The exact scheme a Miras layer with memory ``spec`` runs under this runtime."""
        return resolve_scheme(self.scheme, spec)

    @contextlib.contextmanager
    def batch(self, layout: CPSlice) -> Iterator["CPContext"]:
        """The CP context of one batch laid out by ``layout`` (from ``slice_batch_for_cp``): pass
        it to the model's forward inside the block."""
        if layout.cp_size != self.group.size or layout.cp_rank != self.group.rank:
            raise ValueError(
                f"CPSlice is for rank {layout.cp_rank} of {layout.cp_size} but this process is rank "
                f"{self.group.rank} of a CP group of {self.group.size}: slice with the group's rank and size"
            )
        previous, self.active = self.active, CPContext(self, layout)
        try:
            yield self.active
        finally:
            self.active = previous


@dataclass
class CPContext:
    """CP bound to one batch layout: what the model's mixers and attention layers call (the
    ``ContextParallelContext`` interface of ``miras_pretrain.parallel.layout``)."""

    runtime: ContextParallel
    layout: CPSlice

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Document position of every local token, [T_local] long."""
        return self.layout.positions(device)

    def miras_layer(self, spec, *, batch: int, heads: int, head_dim: int, chunk_size: int,
                    dtype: torch.dtype = torch.float32) -> MirasLayerCP:
        """A Miras mixer's CP helper for one forward: ``.conv(x, w)`` (halo exchange) and
        ``.memory(...)`` (``miras_memory``'s signature; state passing or all-gather).
        ``heads`` are this rank's (TP-local) heads."""
        return MirasLayerCP(self.runtime, self.layout, self.runtime.scheme_for(spec), spec, batch=batch,
                            heads=heads, head_dim=head_dim, chunk_size=chunk_size, dtype=dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None) -> torch.Tensor:
        """Causal (sliding-window) attention over the global sequence for the local queries.
        q, k, v [B, T_local, H, d] (RoPE applied) -> [B, T_local, H, d]."""
        return cp_attention(self.runtime, self.layout, q, k, v, window=window)
