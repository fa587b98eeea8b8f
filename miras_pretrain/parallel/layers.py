"""Tensor-parallel building blocks with one interface for TP and for a plain single process.

When megatron's groups are initialised (:func:`miras_pretrain.parallel.state.is_initialized`)
the factories return megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``VocabParallelEmbedding`` (TP = 1 included); otherwise plain torch layers with the same call
signature (linear layers return ``(output, None)`` like megatron's) and the same parameter names.
megatron's layers cannot run without a process group (their backward asserts a group), hence
the two implementations -- the model code above them is the same.

Every parameter that is split across TP ranks carries megatron's attributes
``tensor_model_parallel=True, partition_dim, partition_stride`` (also in a single process), which
:mod:`.checkpoint` uses to gather and shard state dicts and DeepSpeed uses for grad norms.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import state


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
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


def _megatron_config():
    from megatron.core.model_parallel_config import ModelParallelConfig

    # CPU initialisation draws the full (master) weight from torch's default generator and keeps
    # this rank's slice: the TP model then starts from exactly the single-process weights.
    return ModelParallelConfig(
        tensor_model_parallel_size=state.tensor_parallel_world_size(),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )


def _local(cls, *args, **kwargs) -> nn.Module:
    """Build a torch layer without its default init (which would draw from the RNG): our own
    init then consumes the generator exactly like megatron's CPU init, so a model built with TP
    starts from the slices of the single-process model built with the same seed."""
    return cls(*args, device="meta", **kwargs).to_empty(device="cpu")


class LocalLinear(nn.Linear):
    """``nn.Linear`` returning ``(y, None)`` like megatron's parallel linears; ``weight`` may be
    passed in (tied output head)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):  # type: ignore[override]
        return F.linear(x, self.weight if weight is None else weight, self.bias), None


def shard_rows(full: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This TP rank's contiguous slice of ``full`` along ``dim`` (the whole tensor without TP)."""
    tp = state.tensor_parallel_world_size()
    if tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"dimension {full.shape[dim]} is not divisible by tensor parallel size {tp}")
    return full.chunk(tp, dim=dim)[state.tensor_parallel_rank()].clone()


def column_linear(
    in_features: int, out_features: int, *, init_std: float, bias: bool = False
) -> nn.Module:
    """x [..., in] -> (y [..., out / tp], None); weight [out / tp, in] split along dim 0."""
    if state.is_initialized():
        from megatron.core.tensor_parallel import ColumnParallelLinear

        layer = ColumnParallelLinear(
            in_features, out_features, config=_megatron_config(),
            init_method=normal_init(init_std), bias=bias, gather_output=False,
        )
        return layer
    layer = _local(LocalLinear, in_features, out_features, bias=bias)
    with torch.no_grad():
        normal_init(init_std)(layer.weight)
        if bias:
            layer.bias.zero_()
    mark_tensor_parallel(layer.weight, 0)
    if bias:
        mark_tensor_parallel(layer.bias, 0)
    return layer


def row_linear(in_features: int, out_features: int, *, init_std: float) -> nn.Module:
    """x [..., in / tp] (already split) -> (y [..., out] summed over TP, None); weight
    [out, in / tp] split along dim 1. No bias (Llama style)."""
    if state.is_initialized():
        from megatron.core.tensor_parallel import RowParallelLinear

        return RowParallelLinear(
            in_features, out_features, config=_megatron_config(),
            init_method=normal_init(init_std), bias=False, input_is_parallel=True,
            skip_bias_add=False,
        )
    layer = _local(LocalLinear, in_features, out_features, bias=False)
    with torch.no_grad():
        normal_init(init_std)(layer.weight)
    mark_tensor_parallel(layer.weight, 1)
    return layer


class LocalEmbedding(nn.Embedding):
    pass


def vocab_embedding(vocab_size: int, dim: int, *, init_std: float) -> nn.Module:
    """ids [B, T] -> [B, T, dim]; weight [vocab / tp, dim] split along dim 0."""
    if state.is_initialized():
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        emb = VocabParallelEmbedding(
            vocab_size, dim, init_method=normal_init(init_std), config=_megatron_config()
        )
        if not is_tensor_parallel(emb.weight):
            mark_tensor_parallel(emb.weight, 0)
        return emb
    emb = _local(LocalEmbedding, vocab_size, dim)
    with torch.no_grad():
        normal_init(init_std)(emb.weight)
    mark_tensor_parallel(emb.weight, 0)
    return emb


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross entropy over ``labels != ignore_index``.

    logits: [B, T, V / tp] (vocab-parallel shard under TP, full vocab otherwise), labels [B, T]
    long. Computed in fp32. Returns a scalar (0 when every label is ignored).
    """
    mask = labels != ignore_index
    target = labels.masked_fill(~mask, 0)
    if state.is_initialized():
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # megatron's function modifies the logits' grad buffer in place: give it its own copy
        per_token = vocab_parallel_cross_entropy(logits.float().contiguous(), target)
    else:
        per_token = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view_as(target)
    maskf = mask.to(per_token.dtype)
    return (per_token * maskf).sum() / maskf.sum().clamp_min(1.0)


def tp_all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the TP group (no-op without TP). Not differentiable: for stats."""
    group = state.tensor_parallel_group()
    if group is not None and state.tensor_parallel_world_size() > 1:
        dist.all_reduce(t, group=group)
        if op == "mean":
            t /= state.tensor_parallel_world_size()
    return t
