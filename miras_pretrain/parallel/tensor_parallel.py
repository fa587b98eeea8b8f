"""Tensor parallelism with megatron-core's layers, handed to the model as its layout.

:func:`parallel_layout` is the one place that reads megatron's process-global groups and turns
them into the :class:`~miras_pretrain.parallel.layout.ParallelLayout` the model is built with;
:func:`build_sharded_model` builds this process's shard with it.

megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` return ``(output, bias)``; the
subclasses here return the output only, so the model never sees megatron's tuple. They are
subclasses (not wrappers) so the parameter names stay ``weight`` / ``bias`` and checkpoints
match the single-process model. Importing this module does not import megatron.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from miras_pretrain.model.config import ModelConfig
from miras_pretrain.model.lm import MirasLM, build_model
from miras_pretrain.model.sharded_layers import is_tensor_parallel, mark_tensor_parallel, normal_init

from . import state
from .layout import SINGLE_PROCESS, ParallelLayout


@functools.lru_cache(maxsize=None)
def _megatron_layer_classes() -> tuple[type, type]:
    """megatron's parallel linears returning a tensor (defined on first use: megatron's import
    is slow and needs its groups only when a layer is built)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """x [..., in] -> y [..., out / tp] (megatron's layer without the bias tuple)."""

        def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(input_)[0]

    class RowLinear(RowParallelLinear):
        """x [..., in / tp] -> y [..., out] summed over TP (megatron's layer without the tuple)."""

        def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(input_)[0]

    return ColumnLinear, RowLinear


@dataclass(frozen=True)
class MegatronTensorParallel:
    """The :class:`~miras_pretrain.parallel.layout.TensorParallel` interface over megatron's
    initialised TP group (``initialize_parallel``)."""

    size: int
    rank: int
    group: Any

    def _config(self):
        from megatron.core.model_parallel_config import ModelParallelConfig

        # CPU initialisation draws the full (master) weight from torch's default generator and
        # keeps this rank's slice: the TP model then starts from exactly the single-process weights
        return ModelParallelConfig(
            tensor_model_parallel_size=self.size, use_cpu_initialization=True,
            params_dtype=torch.float32, gradient_accumulation_fusion=False,
        )

    def column_linear(self, in_features: int, out_features: int, *, init_std: float,
                      bias: bool = False) -> nn.Module:
        column, _ = _megatron_layer_classes()
        return column(in_features, out_features, config=self._config(), init_method=normal_init(init_std),
                      bias=bias, gather_output=False)

    def row_linear(self, in_features: int, out_features: int, *, init_std: float) -> nn.Module:
        _, row = _megatron_layer_classes()
        return row(in_features, out_features, config=self._config(), init_method=normal_init(init_std),
                   bias=False, input_is_parallel=True, skip_bias_add=False)

    def vocab_embedding(self, vocab_size: int, dim: int, *, init_std: float) -> nn.Module:
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        emb = VocabParallelEmbedding(vocab_size, dim, init_method=normal_init(init_std), config=self._config())
        if not is_tensor_parallel(emb.weight):
            mark_tensor_parallel(emb.weight, 0)
        return emb

    def copy_to_region(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(x)

    def vocab_cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, target)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None and self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t


def parallel_layout() -> ParallelLayout:
    """This process's model layout: megatron's TP group when ``initialize_parallel`` ran (also at
    TP = 1, so every layout under megatron uses the same layer classes), else a single TP rank."""
    if not state.is_initialized():
        return SINGLE_PROCESS
    return ParallelLayout(MegatronTensorParallel(
        state.tensor_parallel_world_size(), state.tensor_parallel_rank(), state.tensor_parallel_group()))


def build_sharded_model(cfg: ModelConfig | dict) -> MirasLM:
    """``miras_pretrain.model.build_model(cfg)`` with this process's :func:`parallel_layout`:
    its TP shard under megatron's groups, the whole model otherwise."""
    return build_model(cfg, layout=parallel_layout())
