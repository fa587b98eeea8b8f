"""How a model is split over processes, as plain values the model receives.

The model never asks the process which parallel groups exist: it is built with a
:class:`ParallelLayout` (tensor parallelism, fixed for the model's life) and each forward may be
given a context-parallel context (:class:`ContextParallelContext`, one per batch). This module
holds only those two interfaces and imports nothing of this project, so the model can depend on
it without depending on the parallel runtime (process groups, megatron, DeepSpeed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # typing only: no runtime dependency on torch's heavy submodules here
    import torch
    from torch import nn


class TensorParallel(Protocol):
    """A tensor-parallel group and the sharded layers over it (implemented with megatron-core by
    ``miras_pretrain.parallel.tensor_parallel.MegatronTensorParallel``).

    Layers return the output tensor only (no ``(y, bias)`` tuple) and keep the parameter names
    ``weight`` / ``bias``. Split parameters carry megatron's attributes ``tensor_model_parallel``
    and ``partition_dim`` (see ``miras_pretrain.model.sharded_layers.mark_tensor_parallel``).
    """

    size: int
    rank: int
    group: Any

    def column_linear(self, in_features: int, out_features: int, *, init_std: float,
                      bias: bool = False) -> "nn.Module":
        """x [..., in] -> y [..., out / size]; weight [out / size, in]."""

    def row_linear(self, in_features: int, out_features: int, *, init_std: float) -> "nn.Module":
        """x [..., in / size] -> y [..., out] summed over the group; weight [out, in / size]."""

    def vocab_embedding(self, vocab_size: int, dim: int, *, init_std: float) -> "nn.Module":
        """ids [B, T] -> [B, T, dim]; weight [vocab / size, dim]."""

    def copy_to_region(self, x: "torch.Tensor") -> "torch.Tensor":
        """Identity forward, all-reduce of the gradient in backward (replicated input of a
        column-split matmul)."""

    def vocab_cross_entropy(self, logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        """Per-token cross entropy. logits [B, T, V / size] fp32, target [B, T] long -> [B, T]."""

    def all_reduce_(self, t: "torch.Tensor") -> "torch.Tensor":
        """In-place sum over the group (statistics; not differentiable)."""


class ContextParallelContext(Protocol):
    """One batch's context parallelism as the model's layers see it (implemented by
    ``miras_pretrain.parallel.context_parallel.CPContext``): the sequence is split over a CP
    group and this process holds ``T_local`` of its tokens."""

    def positions(self, device: "torch.device | str" = "cpu") -> "torch.Tensor":
        """Position of every local token inside its document, [T_local] long."""

    def miras_layer(self, spec: Any, *, batch: int, heads: int, head_dim: int, chunk_size: int,
                    dtype: "torch.dtype") -> Any:
        """One Miras mixer forward's helper: ``.conv(x [B, T_local, C], w [C, K])`` with the
        halo of the previous rank and ``.memory(...)`` with ``miras_memory``'s signature."""

    def attention(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", *,
                  window: int | None) -> "torch.Tensor":
        """Causal attention of the local queries over the global sequence.
        q, k, v [B, T_local, H, d] (RoPE applied) -> [B, T_local, H, d]."""


@dataclass(frozen=True)
class ParallelLayout:
    """The model's static split over processes. ``tensor_parallel=None``: one TP rank, plain
    torch layers (a single process, or data/context/pipeline parallelism without megatron)."""

    tensor_parallel: TensorParallel | None = None

    @property
    def tp_size(self) -> int:
        return 1 if self.tensor_parallel is None else self.tensor_parallel.size

    @property
    def tp_rank(self) -> int:
        return 0 if self.tensor_parallel is None else self.tensor_parallel.rank


SINGLE_PROCESS = ParallelLayout()
