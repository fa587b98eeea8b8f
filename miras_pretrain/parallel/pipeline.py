"""Pipeline parallelism through DeepSpeed's pipeline engine (1F1B ``TrainSchedule``).

``build_pipeline_module(cfg, num_stages)`` returns a ``deepspeed.pipe.PipelineModule`` made of the
model's own pieces (``TokenEmbedding`` -> ``Block`` x N -> ``LMHead``) as ``LayerSpec``s, so each
stage builds only its layers. Activations between stages are ``h`` [B, T, D] or, for packed
documents, the tuple ``(h, cu_seqlens)``; the engine's data iterator yields
``(input_ids, labels)`` or ``((input_ids, cu_seqlens), labels)``. Under TP the topology is
``PipeModelDataParallelTopology(pp, dp, tp)`` whose rank layout equals megatron's, so the TP
groups megatron's layers use and DeepSpeed's grid agree. Under context parallelism the grid's
data axis is DP x CP and the labels carry a loss factor (see :func:`pipeline_loss`); the engine
calls the stages with activations only, so the batch's CP context is bound to the module around
``train_batch`` / ``eval_batch`` (:meth:`MirasPipelineModule.context_parallel`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from miras_pretrain.model.config import ModelConfig
from miras_pretrain.model.layers import check_cu_seqlens
from miras_pretrain.model.lm import (
    Block, LMHead, TokenEmbedding, check_tp_divisibility, collect_memory_stats, tied_output,
)
from miras_pretrain.model.sharded_layers import lm_cross_entropy

from . import state
from .layout import SINGLE_PROCESS, ContextParallelContext, ParallelLayout
from .tensor_parallel import parallel_layout

TIED_KEY = "embed"


def _split(inputs):
    if isinstance(inputs, (tuple, list)):
        return inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return inputs, None


class EmbeddingPipe(TokenEmbedding):
    """input_ids [B, T] or (input_ids, cu_seqlens) -> h or (h, cu_seqlens)."""

    def forward(self, inputs):  # type: ignore[override]
        ids, cu = _split(inputs)
        h = super().forward(ids)
        if cu is None:
            return h
        check_cu_seqlens(cu, ids.shape[0], ids.shape[1])
        return h, cu


class ContextParallelSlot:
    """The CP context of the batch the pipeline engine is running (None outside one), shared
    by every block of a stage: the engine passes activations only, so the context cannot travel
    with them."""

    def __init__(self) -> None:
        self.context: ContextParallelContext | None = None


class BlockPipe(Block):
    """h or (h, cu_seqlens) -> same structure."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, layout: ParallelLayout,
                 cp_slot: ContextParallelSlot) -> None:
        super().__init__(cfg, layer_idx, layout)
        self.cp_slot = cp_slot

    def forward(self, inputs):  # type: ignore[override]
        h, cu = _split(inputs)
        out = super().forward(h, cu, self.cp_slot.context)
        return out if cu is None else (out, cu)


class LMHeadPipe(LMHead):
    """h or (h, cu_seqlens) -> logits [B, T, V / tp]; with tied embeddings only the final norm
    (the logits come from the tied embedding layer that follows, :func:`tied_logits`)."""

    def forward(self, inputs):  # type: ignore[override]
        h, _ = _split(inputs)
        if self.tied:
            return self.norm(h)
        return super().forward(h)


def tied_logits(embedding: EmbeddingPipe, h: torch.Tensor) -> torch.Tensor:
    """Output head sharing the embedding weight (last stage's copy of the tied module).
    h [B, T, D] -> logits [B, T, V / tp]."""
    return tied_output(h, embedding.word.weight, embedding.layout)


def pipeline_loss(logits: torch.Tensor, labels, layout: ParallelLayout = SINGLE_PROCESS) -> torch.Tensor:
    """Mean token loss of one micro-batch (labels aligned with inputs, -100 ignored).

    ``labels`` is [B, T] long, or ``(labels, factor)`` with a float tensor ``factor`` the loss is
    multiplied by: under context parallelism each rank's factor is CP x its share of the
    micro-batch's counted labels, because the engine averages over its data axis (DP x CP).
    ``layout``: the model's (the vocab-parallel loss under TP)."""
    if isinstance(labels, (tuple, list)):
        labels, factor = labels
        return lm_cross_entropy(logits, labels, layout) * factor.to(torch.float32).reshape(())
    return lm_cross_entropy(logits, labels, layout)


@functools.lru_cache(maxsize=None)
def _pipeline_class():
    """The PipelineModule subclass, defined lazily so importing this module needs no DeepSpeed."""
    from deepspeed.pipe import PipelineModule

    class MirasPipelineModule(PipelineModule):
        """DeepSpeed's PipelineModule plus the model's ``memory_stats()`` (this stage's layers)
        and the binding of a batch's context parallelism."""

        miras_config: ModelConfig
        miras_layout: ParallelLayout
        cp_slot: ContextParallelSlot

        def memory_stats(self) -> dict[str, float]:
            return collect_memory_stats(self, self.miras_layout)

        @contextlib.contextmanager
        def context_parallel(self, cp: ContextParallelContext) -> Iterator[None]:
            """Run the stage's blocks with ``cp`` inside the block (around ``train_batch``)."""
            previous, self.cp_slot.context = self.cp_slot.context, cp
            try:
                yield
            finally:
                self.cp_slot.context = previous

    return MirasPipelineModule


def build_pipeline_module(
    cfg: ModelConfig | dict,
    num_stages: int | None = None,
    *,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    dynamic_shape: bool = True,
):
    """The model as a ``deepspeed.pipe.PipelineModule`` for the current process's stage.

    ``num_stages`` defaults to megatron's pipeline size (``initialize_parallel(tp, pp)`` must
    have run when TP > 1). ``partition_method``: DeepSpeed's ``"parameters"`` (balance parameter
    counts, default), ``"uniform"`` (layer counts) or ``"type:BlockPipe"`` (balance blocks only).
    ``dynamic_shape`` lets micro-batches differ in shape (e.g. number of packed documents in
    ``cu_seqlens``); it costs one small metadata message per micro-batch.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    layout = parallel_layout()
    check_tp_divisibility(cfg, layout)
    if state.is_initialized():
        # DeepSpeed's grid has no CP axis: its data axis is DP x CP (megatron's tp-cp-dp-pp
        # order puts CP right inside DP, the grid's order puts data right outside model = TP, so
        # the two agree rank for rank); gradients are then averaged over DP x CP
        pp, tp, dp = (state.pipeline_parallel_world_size(), state.tensor_parallel_world_size(),
                      state.data_context_parallel_world_size())
        if num_stages is not None and num_stages != pp:
            raise ValueError(
                f"build_pipeline_module: num_stages={num_stages} differs from the pipeline size "
                f"{pp} given to initialize_parallel; pass num_stages=None or {pp}"
            )
        topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        num_stages = None
    else:
        if num_stages is None:
            raise ValueError("build_pipeline_module: pass num_stages or call initialize_parallel first")
        topology = None
    if cfg.n_layers + 2 < (num_stages or topology.get_dim("pipe")):
        raise ValueError("build_pipeline_module: more pipeline stages than layers")
    cp_slot = ContextParallelSlot()
    specs: list = []
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, layout, tied_weight_attr=["word.weight"]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, cfg, layout))
    specs += [LayerSpec(BlockPipe, cfg, i, layout, cp_slot) for i in range(cfg.n_layers)]
    specs.append(LayerSpec(LMHeadPipe, cfg, layout))
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, layout, forward_fn=tied_logits,
                                   tied_weight_attr=["word.weight"]))
    module = _pipeline_class()(
        layers=specs, num_stages=num_stages, topology=topology, loss_fn=functools.partial(pipeline_loss, layout=layout),
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        dynamic_shape=dynamic_shape,
    )
    if state.is_initialized() and module.stage_id != state.pipeline_parallel_rank():
        raise RuntimeError(
            f"DeepSpeed stage {module.stage_id} != megatron pipeline rank "
            f"{state.pipeline_parallel_rank()}: rank layouts disagree"
        )
    module.miras_config = cfg
    module.miras_layout = layout
    module.cp_slot = cp_slot
    return module
