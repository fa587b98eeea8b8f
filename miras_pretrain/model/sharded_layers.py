"""Linear and embedding layers, the LM loss and per-head parameters, for one TP rank or many.

Every factory takes the model's :class:`ParallelLayout`. Without tensor parallelism it builds
plain torch layers; with it, it asks the layout's :class:`TensorParallel` implementation
(megatron-core's parallel layers). Both return the output tensor only and name their parameters
``weight`` / ``bias``, so the model code above them and the checkpoints are the same.

Every parameter that is split across TP ranks carries megatron's attributes
``tensor_model_parallel=True, partition_dim, partition_stride`` (also in a single process): the
state-dict conversion (``miras_pretrain.parallel.checkpoint``) gathers and shards by them and
DeepSpeed counts them once in gradient norms.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from miras_pretrain.parallel.layout import ParallelLayout


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place N(0, std) initialiser (megatron's ``init_method`` convention)."""

    def init(t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, mean=0.0, std=std)

    return init


def mark_tensor_parallel(param: torch.Tensor, dim: int) -> None:
    """Tag ``param`` as split along ``dim`` across TP ranks (megatron's attribute names)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _uninitialised(cls, *args, **kwargs) -> nn.Module:
    """Build a torch layer without its default init, which would draw from the RNG: our own init
    then consumes the generator exactly like megatron's CPU init, so a TP model starts from the
    slices of the single-process model built with the same seed."""
    return cls(*args, device="meta", **kwargs).to_empty(device="cpu")


class LocalLinear(nn.Linear):
    """``nn.Linear`` of a single TP rank. x [..., in] -> [..., out]."""


class LocalEmbedding(nn.Embedding):
    """``nn.Embedding`` of a single TP rank. ids [B, T] -> [B, T, dim]."""


def shard_rows(full: torch.Tensor, layout: ParallelLayout, dim: int = 0) -> torch.Tensor:
    """This TP rank's contiguous slice of ``full`` along ``dim`` (the whole tensor without TP)."""
    tp = layout.tp_size
    if tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"dimension {full.shape[dim]} is not divisible by tensor parallel size {tp}")
    return full.chunk(tp, dim=dim)[layout.tp_rank].clone()


def local_heads(n_heads: int, layout: ParallelLayout) -> int:
    """Heads held by this TP rank."""
    tp = layout.tp_size
    if n_heads % tp:
        raise ValueError(f"n_heads={n_heads} is not divisible by the tensor parallel size {tp}")
    return n_heads // tp


def column_linear(layout: ParallelLayout, in_features: int, out_features: int, *, init_std: float,
                  bias: bool = False) -> nn.Module:
    """x [..., in] -> y [..., out / tp]; weight [out / tp, in] split along dim 0."""
    if layout.tensor_parallel is not None:
        return layout.tensor_parallel.column_linear(in_features, out_features, init_std=init_std, bias=bias)
    layer = _uninitialised(LocalLinear, in_features, out_features, bias=bias)
    with torch.no_grad():
        normal_init(init_std)(layer.weight)
        if bias:
            layer.bias.zero_()
    mark_tensor_parallel(layer.weight, 0)
    if bias:
        mark_tensor_parallel(layer.bias, 0)
    return layer


def row_linear(layout: ParallelLayout, in_features: int, out_features: int, *, init_std: float) -> nn.Module:
    """x [..., in / tp] (already split) -> y [..., out] summed over TP; weight [out, in / tp]
    split along dim 1. No bias (Llama style)."""
    if layout.tensor_parallel is not None:
        return layout.tensor_parallel.row_linear(in_features, out_features, init_std=init_std)
    layer = _uninitialised(LocalLinear, in_features, out_features, bias=False)
    with torch.no_grad():
        normal_init(init_std)(layer.weight)
    mark_tensor_parallel(layer.weight, 1)
    return layer


def vocab_embedding(layout: ParallelLayout, vocab_size: int, dim: int, *, init_std: float) -> nn.Module:
    """ids [B, T] -> [B, T, dim]; weight [vocab / tp, dim] split along dim 0."""
    if layout.tensor_parallel is not None:
        return layout.tensor_parallel.vocab_embedding(vocab_size, dim, init_std=init_std)
    emb = _uninitialised(LocalEmbedding, vocab_size, dim)
    with torch.no_grad():
        normal_init(init_std)(emb.weight)
    mark_tensor_parallel(emb.weight, 0)
    return emb


def copy_to_tensor_parallel_region(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """``x`` unchanged; under TP its gradient is all-reduced over the group, as a
    column-parallel layer does for its replicated input (the tied output head)."""
    if layout.tensor_parallel is None:
        return x
    return layout.tensor_parallel.copy_to_region(x)


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, layout: ParallelLayout,
                     ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross entropy over ``labels != ignore_index``.

    logits: [B, T, V / tp] (vocab-parallel shard under TP, full vocab otherwise), labels [B, T]
    long. Computed in fp32. Returns a scalar (0 when every label is ignored).
    """
    mask = labels != ignore_index
    target = labels.masked_fill(~mask, 0)
    if layout.tensor_parallel is not None:
        # megatron's function modifies the logits' grad buffer in place: give it its own copy
        per_token = layout.tensor_parallel.vocab_cross_entropy(logits.float().contiguous(), target)
    else:
        per_token = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view_as(target)
    maskf = mask.to(per_token.dtype)
    return (per_token * maskf).sum() / maskf.sum().clamp_min(1.0)


def tp_all_reduce_(t: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """In-place sum over the TP group (no-op without TP). Not differentiable: for stats."""
    if layout.tensor_parallel is not None and layout.tp_size > 1:
        layout.tensor_parallel.all_reduce_(t)
    return t
